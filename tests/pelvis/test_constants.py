"""The pelvis application's constants (mtl_med.pelvis) agree with what the bundle states in its metadata and
configs, and the bundle's configs pass them to the generic code, which has no pelvis defaults."""

from __future__ import annotations

import json
from pathlib import Path

from mtl_med import pelvis
from mtl_med.metrics.medical import case_metrics
from mtl_med.pelvis import PSNR_DATA_RANGE_HU

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "sfg_highresnet_pelvis" / "configs"


def _labels(channel_def):
    return {int(k): v for k, v in channel_def.items()}


def test_metadata_states_the_label_table_the_ct_range_and_the_tasks():
    meta = json.loads((BUNDLE / "metadata.json").read_text())
    post = meta["network_data_format"]["post_processed_outputs"]
    assert _labels(post[pelvis.SEG_TASK]["channel_def"]) == pelvis.LABEL_TABLE
    assert post[pelvis.SEG_TASK]["value_range"] == [0, pelvis.NUM_LABELS - 1]
    assert tuple(post[pelvis.SCT_TASK]["value_range"]) == pelvis.CT_RANGE_HU
    assert post["sct_std"]["value_range"][1] == PSNR_DATA_RANGE_HU
    net = meta["network_def_data_format"]["outputs"]
    assert tuple(net) == pelvis.TASK_NAMES
    assert _labels(net[pelvis.SEG_TASK]["channel_def"]) == pelvis.LABEL_TABLE
    assert net[pelvis.SEG_TASK]["num_channels"] == pelvis.NUM_LABELS


def test_inference_config_names_the_same_tasks_and_classes():
    cfg = json.loads((BUNDLE / "inference.json").read_text())
    assert tuple(cfg["task_names"]) == pelvis.TASK_NAMES
    assert cfg["num_classes"] == pelvis.NUM_LABELS


def test_constants_and_the_defaults_that_use_them():
    assert pelvis.CT_RANGE_HU == (-1024.0, 2500.0) and pelvis.CT_SCALE == 1024.0
    assert pelvis.DICE_ORGANS == {"left_femoral_head": 1, "right_femoral_head": 2, "prostate": 3, "bladder": 4,
                                  "rectum": 5}
    assert set(pelvis.PSNR_ORGANS.values()) <= set(pelvis.LABEL_TABLE) - {0}
    for name in ("inference.json", "evaluate.json"):  # the bundle's CT scaling is the pelvis range and scale
        pre = json.loads((BUNDLE / name).read_text())["volume_preprocessing"]
        assert pre["ct_clip"] == "$mtl_med.pelvis.CT_RANGE_HU" and pre["ct_scale"] == "$mtl_med.pelvis.CT_SCALE"
        assert pre["label_table"] == "$mtl_med.pelvis.LABEL_TABLE"
    train = json.loads((BUNDLE / "train.json").read_text())["preprocessing"]
    assert ("ct_clip=mtl_med.pelvis.CT_RANGE_HU, ct_scale=mtl_med.pelvis.CT_SCALE, label_table=mtl_med.pelvis.LABEL_TABLE"
            in train)
    assert PSNR_DATA_RANGE_HU == pelvis.CT_RANGE_HU[1] - pelvis.CT_RANGE_HU[0]
    row = case_metrics(seg=[[0, 1]], label=[[0, 1]], **pelvis.TABLE2_METRICS)
    assert set(row) == {f"dice_{k}" for k in pelvis.DICE_ORGANS} | {"dice_mean"}


def test_the_bundle_presents_the_organs_with_the_pelvis_colours_codes_and_model_name():
    """The overview and DICOM writers hold no organ: the bundle's writer passes the pelvis presentation."""
    for name in ("inference.json", "evaluate.json"):
        writer = json.loads((BUNDLE / name).read_text())["predictor"]["writer"]
        assert {k: writer[k] for k in ("label_table", "label_colours", "model_name", "organ_codes", "organ_colours")} == {
            k: f"$mtl_med.pelvis.{v}" for k, v in (("label_table", "LABEL_TABLE"), ("label_colours", "LABEL_COLOURS"),
                                                  ("model_name", "MODEL_NAME"), ("organ_codes", "ORGAN_CODES"),
                                                  ("organ_colours", "ORGAN_COLOURS"))}
    organs = set(pelvis.LABEL_TABLE) - {0}
    assert set(pelvis.ORGAN_CODES) == set(pelvis.ORGAN_COLOURS) == organs
    assert len(pelvis.LABEL_COLOURS) == pelvis.NUM_LABELS and pelvis.LABEL_COLOURS[0] == "black"
