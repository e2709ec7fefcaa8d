"""The pelvis application's values (SFG paper, section 5.2 and appendix A.3): its label table, CT intensity range
and scale, task names, the organs of its metric tables, and how its outputs present the organs (overview colours,
DICOM model name, SNOMED CT codes and display colours). (The datalist's image keys and roles are the generic
datalist convention of :mod:`mtl_med.data.nifti`: they name no organ.)

Generic code (NIfTI checks, transforms, metrics, inference) takes these values as arguments; the bundle's configs
and the pelvis tables pass them from :mod:`mtl_med.pelvis`, so another application changes them in one place. The
bundle ``bundles/sfg_highresnet_pelvis`` states the same values in ``configs/metadata.json``
(``tests/pelvis/test_constants.py`` checks that the two agree).
"""

from __future__ import annotations

__all__ = [
    "LABEL_TABLE",
    "NUM_LABELS",
    "CT_RANGE_HU",
    "CT_SCALE",
    "SCT_TASK",
    "SEG_TASK",
    "TASK_NAMES",
    "PSNR_ORGANS",
    "DICE_ORGANS",
    "PSNR_DATA_RANGE_HU",
    "TABLE2_METRICS",
    "LABEL_COLOURS",
    "MODEL_NAME",
    "ORGAN_CODES",
    "ORGAN_COLOURS",
    "BODY_PART",
]

# DESIGN.md "Medical data conventions": the SFG paper's organs.
LABEL_TABLE: dict[int, str] = {
    0: "background",
    1: "left femoral head",
    2: "right femoral head",
    3: "prostate",
    4: "bladder",
    5: "rectum",
}
NUM_LABELS = len(LABEL_TABLE)  # classes of the segmentation output, background included
# A.3: CT range [-1024, 2500] HU, background -1024.
CT_RANGE_HU = (-1024.0, 2500.0)
# A.3: network scale CT/1024 + 1 (HU = CT_SCALE * (x - 1))
CT_SCALE = 1024.0

# the two tasks: synthetic CT (regression, network scale) and the label map (segmentation logits)
SCT_TASK = "sct"
SEG_TASK = "seg"
TASK_NAMES = (SCT_TASK, SEG_TASK)

# Table 2a: per-organ PSNR columns; Table 2b: Dice columns (every organ of LABEL_TABLE)
PSNR_ORGANS: dict[str, int] = {"prostate": 3, "bladder": 4, "rectum": 5}
DICE_ORGANS: dict[str, int] = {name.replace(" ", "_"): idx for idx, name in LABEL_TABLE.items() if idx > 0}
# Table 2's PSNR data range R (HU): the width of the CT range, 3524 HU
PSNR_DATA_RANGE_HU = CT_RANGE_HU[1] - CT_RANGE_HU[0]
# the keyword arguments of mtl_med.metrics.medical.case_metrics for Table 2
TABLE2_METRICS = {"data_range": PSNR_DATA_RANGE_HU, "psnr_organs": PSNR_ORGANS, "dice_organs": DICE_ORGANS}

# the overview figure (mtl_med.inference.overview): a matplotlib colour per label, background first
LABEL_COLOURS = ("black", "gold", "orange", "red", "deepskyblue", "limegreen")
# the DICOM outputs (mtl_med.inference.dicom_outputs): the model they name as their maker, the organs' SNOMED CT
# codes (SEG; the segment label says left / right: SNOMED CT has one concept for both femoral heads) and their
# display colours (RTSTRUCT)
MODEL_NAME = "SFG-HighResNet pelvis sCT and organs"
ORGAN_CODES: dict[int, tuple[str, str]] = {1: ("2812003", "Femoral head"), 2: ("2812003", "Femoral head"),
                                           3: ("41216001", "Prostate"), 4: ("89837001", "Bladder"),
                                           5: ("34402009", "Rectum")}
ORGAN_COLOURS: dict[int, tuple[int, int, int]] = {1: (255, 220, 0), 2: (0, 200, 255), 3: (0, 200, 0), 4: (255, 255, 0),
                                                  5: (180, 90, 40)}
# DICOM Body Part Examined of a synthetic CT whose MR source names none: what the network is trained on
BODY_PART = "PELVIS"
