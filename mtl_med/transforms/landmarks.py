"""Learn histogram-standardisation landmarks (A.3, ref. [40]) from the training section of a datalist.

Each training MR is loaded with the project's checks, N4-corrected as in training (same parameters, same
cache), and its 1st / decile / 99th percentiles inside the foreground enter the average. The result is a JSON
file that ``HistogramStandardized`` (training and inference) reads.

Its own module rather than part of :mod:`mtl_med.transforms.histogram`: it runs the preprocessing pipeline of
:mod:`mtl_med.transforms.patches`, which itself imports ``histogram``, so putting it there would make an
import cycle; ``patches`` is about the training pipelines, not landmark learning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from mtl_med.data.nifti import check_datalist
from mtl_med.errors import InputError
from mtl_med.transforms.histogram import DEFAULT_QUANTILES, learn_landmarks, save_landmarks
from mtl_med.transforms.patches import preprocess_transforms

__all__ = ["learn_from_datalist"]

logger = logging.getLogger(__name__)


def learn_from_datalist(
    datalist,
    out,
    *,
    key: str = "mr",
    section: str = "training",
    n4: bool = True,
    n4_shrink_factor: int = 4,
    n4_cache_dir=None,
    foreground_method: str | None = "otsu",
    quantiles: Sequence[float] = DEFAULT_QUANTILES,
    progress: bool = True,
) -> tuple[Path | None, list[str]]:
    """Learn landmarks over ``datalist[section][*][key]`` and save them to ``out``.

    ``datalist`` is a datalist file or dict (as :func:`mtl_med.data.check_datalist` takes). A bad volume is
    logged and skipped; returns (written path or None if no image was usable, failed files). An unreadable
    datalist raises :class:`mtl_med.data.InputError`.
    """
    items = check_datalist(datalist, sections=(section,))[section]
    pre = preprocess_transforms(("mr",), landmarks=None, n4=n4, n4_shrink_factor=n4_shrink_factor,
                                n4_cache_dir=n4_cache_dir, pixdim=None)
    images, failed = [], []
    with logging_redirect_tqdm():
        for item in tqdm(items, desc="landmarks", unit="image", disable=None if progress else True):
            path = item[key]
            try:
                logger.info("reading %s%s", path, " (N4)" if n4 else "")
                images.append(pre({"mr": path})["mr"])
            except InputError as err:
                logger.error("%s", err)
                failed.append(str(path))
    if not images:
        return None, failed
    lm = learn_landmarks(images, quantiles=quantiles, foreground_method=foreground_method)
    out = save_landmarks(out, lm, modality=key, quantiles=quantiles, foreground_method=foreground_method,
                         num_images=len(images), source=str(datalist) if not isinstance(datalist, dict) else None)
    return out, failed
