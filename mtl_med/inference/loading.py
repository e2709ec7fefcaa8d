"""Reading and preprocessing the cases of a run, in this process or in DataLoader worker processes (N4 takes
seconds per case) while this process runs the network."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from mtl_med.transforms.io import unwrap_input_error

__all__ = ["load_and_preprocess", "prepared_cases"]

logger = logging.getLogger("mtl_med.inference")


def _identity(x: Any) -> Any:
    return x


def load_and_preprocess(predictor: Any, item: Mapping[str, Any], portable: bool = True) -> tuple[Any, Any, Any]:
    """(loaded item, preprocessed data, None) or (item, None, the error) of ``predictor`` (its
    ``read_dicom_inputs`` and ``preprocess``); a worker (``portable``) hands back a picklable error."""
    try:
        t0 = time.perf_counter()
        loaded = predictor.read_dicom_inputs(item)
        data = predictor.preprocess(loaded)
        logger.info("%s: read and preprocessed in %.1f s%s", item.get("name"), time.perf_counter() - t0,
                    " (DataLoader worker)" if portable else "")
        return loaded, data, None
    except Exception as err:
        if not portable:
            return dict(item), None, err
        user = unwrap_input_error(err)
        if user is None:  # keep it picklable and readable across the worker boundary
            user = RuntimeError(f"{type(err).__name__}: {err}")
        return dict(item), None, user


class _PreprocessedCases(torch.utils.data.Dataset):
    """Cases read and preprocessed in DataLoader workers (the predictor's preprocessing, forked with it)."""

    def __init__(self, predictor: Any, items: Sequence[Mapping[str, Any]]):
        self.predictor, self.items = predictor, list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Any, Any, Any]:
        return load_and_preprocess(self.predictor, self.items[i])


def prepared_cases(predictor: Any, items: Sequence[Mapping[str, Any]], num_workers: int) -> Iterator[tuple]:
    """``(item, loaded item, preprocessed data or None, error or None)`` per case, in order. With
    ``num_workers > 0`` DICOM reading and preprocessing run in DataLoader worker processes while this process
    runs the network; at most ``2 * num_workers`` cases wait in memory."""
    if num_workers <= 0:
        for item in items:
            yield (item, *load_and_preprocess(predictor, item, portable=False))
        return
    loader = torch.utils.data.DataLoader(_PreprocessedCases(predictor, items), batch_size=None, shuffle=False,
                                         num_workers=int(num_workers), collate_fn=_identity, prefetch_factor=2,
                                         persistent_workers=False)
    for item, res in zip(items, loader):
        yield (item, *res)
