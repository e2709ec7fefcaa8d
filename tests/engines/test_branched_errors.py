"""The Branched search's config errors are ConfigErrors naming the config id, reported in one line."""

import pytest
import torch

from mtl_med.sharing.branched import BranchedSearch, held_out_slices
from mtl_med.errors import ConfigError, user_error


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: held_out_slices([torch.zeros(1, 8, 8, 4)], 2, 0, [8], "image", 2), "slice_size"),
        (lambda: held_out_slices([torch.zeros(8, 8)], 2, 0, [8, 8], "image", 2), "image_key"),
        (lambda: held_out_slices([], 2, 0, [8, 8], "image", 2), "images"),
        (lambda: BranchedSearch("train.json", ["a", "b"], "out", None, search="greedy"), "search"),
        (lambda: BranchedSearch("train.json", ["a", "b"], "out", None, budget_fraction=1.5), "budget_fraction"),
    ],
)
def test_config_errors_name_the_config_id(call, name):
    with pytest.raises(ConfigError) as info:
        call()
    assert user_error(info.value) is info.value
    assert str(info.value).startswith(name) and "\n" not in str(info.value)
