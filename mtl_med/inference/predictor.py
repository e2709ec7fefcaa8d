"""Whole-volume posterior inference of a 2D (slice-wise) or 3D multi-task network (SFG paper, section 5.2).

Per case: preprocessing once (N4 -> histogram standardisation with the training landmarks -> resampling,
:func:`mtl_med.transforms.preprocess_transforms`), then MONAI's ``SliceInferer`` (2D network) or
``SlidingWindowInferer`` (3D network) over the whole volume with
:class:`~mtl_med.inference.posterior.PosteriorSampler` (the sampler of :func:`sample_posterior` too) as its
network: for each batch of slices it runs all S posterior samples itself, ``k`` copies of the batch per forward
call with one group assignment per copy (``per_example``), aggregated on the fly, and returns per-slice statistic
maps (``sct_mean``, ``sct_std``, ``seg_votes``) that the inferer stitches into 3D. Memory holds those maps, never S
volumes. The maps are converted to HU / labels / uncertainty and resampled back to the input grid
(:class:`~mtl_med.inference.maps.OutputMaps`), then written atomically as ``output_dir/<case>/<case>_<postfix>.nii.gz``
(:class:`~mtl_med.inference.writer.CaseWriter`).

An input may be a DICOM MR series folder (:mod:`mtl_med.data.dicom`: read by MONAI's ITK reader, its slice geometry
carried by the affine into the same orientation handling); the writer's ``dicom_outputs`` then adds the synthetic CT
as a CT series and the organs as DICOM SEG and / or RTSTRUCT on the series' own grid, beside the NIfTI files.

Every voxel sees S independent posterior draws; neighbouring slices of one draw do not share an assignment
(each slice-copy has its own), which leaves the per-voxel statistics (mean, variance, votes) unchanged.

:class:`VolumePredictor` composes the parts, each with one job: the sampler, the output maps, the case metrics
(:class:`~mtl_med.inference.evaluation.CaseMetrics`) and the writer; the cases come from
:func:`~mtl_med.inference.cases.list_cases`, are read and preprocessed by :mod:`mtl_med.inference.loading` and
dealt to the ranks by :mod:`mtl_med.inference.distributed`.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from tqdm.auto import tqdm

from mtl_med.data.nifti import DICOM_ROLES
from mtl_med.errors import CaseFailures, InputError, as_bool
from mtl_med.inference import provenance
from mtl_med.inference.cases import case_names, list_cases
from mtl_med.inference.checkpoint import load_checkpoint
from mtl_med.inference.distributed import gather_results, my_share, rank_world
from mtl_med.inference.evaluation import CaseMetrics, format_metrics
from mtl_med.inference.loading import prepared_cases
from mtl_med.inference.maps import OutputMaps
from mtl_med.inference.posterior import PosteriorSampler
from mtl_med.inference.publish import check_output_dir
from mtl_med.inference.writer import CaseWriter
from mtl_med.transforms.io import as_metatensor

__all__ = ["VolumePredictor"]

logger = logging.getLogger("mtl_med.inference")


class VolumePredictor:
    """Posterior inference on whole MR volumes, from a bundle config (``configs/inference.json``).

    Args:
        sampler: the :class:`~mtl_med.inference.posterior.PosteriorSampler` of the network (``network_def`` on
            ``device``): S posterior samples (section 5.2: 50) or ``"auto"``, images per forward call, margin,
            inference mode, engine, dtype, the ``"auto"`` rule, its regression and label tasks. Its ``amp`` is
            used on CUDA only. In argmax mode one pass is made and :attr:`num_samples` (logs, metrics summary) is 1.
        preprocessing: a MONAI ``Compose`` for datalist items, or a ``functools.partial`` building one (the
            config's ``_mode_: callable``, so a missing landmarks file is reported when the run starts).
        inferer: MONAI ``SliceInferer`` (2D network) or ``SlidingWindowInferer`` (3D network).
        maps: the :class:`~mtl_med.inference.maps.OutputMaps` (HU conversion, uncertainty, input grid).
        writer: the :class:`~mtl_med.inference.writer.CaseWriter` (output folder, postfixes, overview, DICOM).
        metrics: the :class:`~mtl_med.inference.evaluation.CaseMetrics` of items with a CT and / or labels.
        ckpt_path: state dict to load (None: keep the network's weights, e.g. in tests).
        device: compute device; the checkpoint is mapped onto it.
        seed: seed of the group draws; the generator is re-seeded for every case, so a case's outputs do not
            depend on the other cases.
        progress: show tqdm bars (on a terminal only: a log file gets no bar lines).
    """

    def __init__(self, sampler: PosteriorSampler, preprocessing: Any, inferer: Inferer, maps: OutputMaps,
                 writer: CaseWriter, metrics: CaseMetrics, ckpt_path: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu", seed: int = 0, progress: bool = True):
        self.device = torch.device(device)
        self.sampler = sampler
        self.sampler.network = sampler.network.to(self.device)
        self.sampler.amp = bool(sampler.amp) and self.device.type == "cuda"
        self._preprocessing = preprocessing
        self.inferer = inferer
        self.maps, self.writer = maps, writer
        self.case_metrics = metrics
        self.ckpt_path = ckpt_path
        self.seed = int(seed)
        self.progress = as_bool(progress, "progress")
        self._loaded = False
        self._pre = None

    # ---- the parts' settings (what logs, run records and callers read)
    network = property(lambda self: self.sampler.network, doc="The network (the sampler's).")
    num_samples = property(lambda self: self.sampler.num_samples,
                           doc="Posterior passes made per slice: the configured S, or 1 in argmax mode.")
    inference_mode = property(lambda self: self.sampler.mode)
    max_batch = property(lambda self: self.sampler.max_batch)
    margin = property(lambda self: self.sampler.margin)
    amp = property(lambda self: self.sampler.amp)
    uncertainty = property(lambda self: self.maps.uncertainty)
    ct_clip = property(lambda self: self.maps.ct_clip)
    bone_threshold_hu = property(lambda self: self.case_metrics.bone_threshold_hu)
    output_dir = property(lambda self: self.writer.output_dir)
    postfixes = property(lambda self: self.writer.postfixes)
    save_png = property(lambda self: self.writer.save_png)
    dicom_outputs = property(lambda self: self.writer.dicom_outputs)

    # ---- setup
    @property
    def preprocessing(self):
        if self._pre is None:
            p = self._preprocessing
            self._pre = p() if isinstance(p, functools.partial) else p
        return self._pre

    def setup(self) -> None:
        """Load the checkpoint and build the preprocessing (reads the landmarks file); errors name the file."""
        if not self._loaded:
            if self.ckpt_path is not None:
                logger.info("loading checkpoint %s (map_location=%s)", self.ckpt_path, self.device)
                load_checkpoint(self.network, self.ckpt_path, map_location=self.device)
            self._loaded = True
        _ = self.preprocessing

    def generator(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.seed)

    # ---- one case, in memory
    def read_dicom_inputs(self, item: Mapping[str, Any]) -> dict:
        """The item with its DICOM series folders ("mr", "ct") read into MetaTensors (:func:`mtl_med.data.dicom.load_series`)
        and the MR series' headers under ``"dicom_mr"`` (what the DICOM writers reference). An item that asks
        for ``dicom_outputs`` without an MR series is refused here, before any work."""
        from mtl_med.data.dicom import is_series_folder, load_series, read_headers

        it = dict(item)
        for key, modality in DICOM_ROLES.items():
            v = it.get(key)
            if isinstance(v, (str, os.PathLike)) and Path(v).is_dir():
                if not is_series_folder(v):
                    raise InputError(v, f"{key} folder holds no DICOM files")
                hdr = read_headers(v, role=key, modality=modality)
                it[key] = load_series(v, role=key, headers=hdr)
                if key == "mr":
                    it["dicom_mr"] = hdr
        if self.dicom_outputs and "dicom_mr" not in it:
            name = item.get("mr") if isinstance(item.get("mr"), (str, os.PathLike)) else "<in-memory MR>"
            raise InputError(name, f"dicom_outputs {list(self.dicom_outputs)} need a DICOM MR series folder as "
                                   "input (its patient, study and frame of reference); this input is not one")
        return it

    def preprocess(self, item: Mapping[str, Any]) -> dict:
        data = self.preprocessing(dict(item))
        if isinstance(data, list):  # a Compose of random crops would return a list
            raise ValueError("the inference preprocessing must return one item per case")
        return data

    @torch.no_grad()
    def sample(self, data: Mapping[str, Any], progress: Any = None) -> dict[str, torch.Tensor]:
        """Posterior statistic maps on the preprocessed grid (:meth:`OutputMaps.from_statistics`)."""
        self.setup()
        mr = data["mr"]
        vol = (mr.as_tensor() if isinstance(mr, MetaTensor) else torch.as_tensor(mr)).float()[None].to(self.device)
        if progress is not None:
            axis = getattr(self.inferer, "spatial_dim", None)
            progress.reset(total=vol.shape[2 + axis] * self.num_samples if axis is not None else None)
        return self.maps.from_statistics(self.sampler.run(self.inferer, vol, generator=self.generator(), progress=progress))

    def to_input_grid(self, data: Mapping[str, Any], maps: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Resample the output maps back to the input MR grid (``Invertd``; labels nearest) -> numpy (spatial)."""
        return self.maps.to_input_grid(data, maps, self.preprocessing)

    def metrics(self, data: Mapping[str, Any], maps: Mapping[str, torch.Tensor], item: Mapping[str, Any]) -> dict:
        """Table 2 metrics on the preprocessed (common, A.3: 1.46 mm) grid when the item has CT and/or labels."""
        return self.case_metrics(data, maps, item, self.maps.to_hu)

    def check_posterior(self, name: Any, maps: Mapping[str, torch.Tensor]) -> float:
        return self.maps.check_posterior(name, maps)

    def predict_item(self, item: Mapping[str, Any], progress: Any = None,
                     data: Mapping[str, Any] | None = None) -> tuple[dict, dict, dict, dict]:
        """(input-grid outputs as numpy, common-grid maps, metrics, preprocessed data) of one datalist item
        (``data``: its preprocessing done already, e.g. in a DataLoader worker)."""
        t0 = time.perf_counter()
        pre = "done before"
        data_given = data is not None
        if data is None:
            logger.info("%s: preprocessing (orientation, N4, histogram standardisation, resampling)", item.get("name"))
            data = self.preprocess(item)
            pre = f"{time.perf_counter() - t0:.1f} s"
        t1 = time.perf_counter()
        adaptive = self.sampler.adaptive and self.inference_mode == "sample"
        logger.info("%s: %s posterior samples of every axial slice", item.get("name"),
                    f"up to {self.num_samples}" if adaptive else self.num_samples)
        self.sampler.reset_passes()
        maps = self.sample(data, progress)
        self.check_posterior(item.get("name", item["mr"]), maps)
        t2 = time.perf_counter()
        out = self.to_input_grid(data, maps)
        metrics = self.metrics(data, maps, item)
        passes: dict[str, Any] = {"num_samples": self.num_samples, "adaptive": adaptive}
        if adaptive:
            used = self.sampler.passes_used()
            metrics = {**metrics, "passes": used["mean"]}
            passes["per_slice_batch"] = used
            logger.info("%s: %.1f passes per slice batch on average (%d-%d)", item.get("name"), used["mean"], used["min"], used["max"])
        t3 = time.perf_counter()
        logger.info("%s: preprocessing %s, %s-sample inference %.1f s, resampling back %.1f s",
                    item.get("name", item["mr"]), pre, "adaptive" if adaptive else self.num_samples, t2 - t1, t3 - t2)
        # for the case's run record (write): seconds per step, the passes made
        self._case_info = {"case": item.get("name"), "passes": passes, "timings": {
            "preprocess": None if data_given else t1 - t0, "inference": t2 - t1, "resampling": t3 - t2}}
        return out, maps, metrics, data

    # ---- writing
    def output_paths(self, case: str, output_dir: str | os.PathLike | None = None) -> dict[str, Path]:
        """Every file of ``case`` (:meth:`CaseWriter.paths`)."""
        return self.writer.paths(case, output_dir)

    def complete(self, case: str, output_dir: str | os.PathLike | None = None) -> bool:
        """Whether ``case`` has its complete output set in ``output_dir``."""
        return self.writer.complete(case, output_dir)

    def write(self, case: str, item: Mapping[str, Any], out: Mapping[str, np.ndarray],
              output_dir: str | os.PathLike | None = None, metrics: Mapping[str, float] | None = None,
              reference: Any = None, source: Mapping[str, Any] | None = None,
              timings: Mapping[str, Any] | None = None) -> dict[str, Path]:
        """Write a case's outputs whole or not at all (:meth:`CaseWriter.write`), every NIfTI's ``descrip``
        naming the package, model and weights, and the run record ``<case>_run.json`` last: the digests of the
        inputs (``source``: the item as given, before DICOM reading; default ``item``), the weights, the
        settings, the software, the machine and the seconds of each step (``timings``, added to those
        :meth:`predict_item` kept for this case)."""
        t_write = time.perf_counter()
        ident = provenance.model_identity(self)
        info = getattr(self, "_case_info", None) or {}
        info = info if info.get("case") == case else {}

        def record(names: list[str]) -> dict[str, Any]:
            steps = {**info.get("timings", {}), **dict(timings or {}), "writing": time.perf_counter() - t_write}
            return provenance.run_record(self, case, source if source is not None else item, names, timings=steps,
                                         passes=info.get("passes"), metrics=metrics, identity=ident)

        return self.writer.write(case, item, out, output_dir, metrics=metrics, reference=reference, identity=ident,
                                 record=record)

    # ---- runs
    def predict_case(self, mr: Any, affine: Any = None, output_dir: str | os.PathLike | None = None,
                     case: str | None = None, **item: Any) -> dict[str, Any]:
        """Pipeline entry point. ``mr``: a NIfTI path, a DICOM MR series folder, a numpy array or tensor (with
        ``affine``, RAS+ mm; identity when None), a nibabel image, a MONAI MetaTensor (its affine) or a SimpleITK image; in-memory
        inputs stay in memory. Extra item keys (``ct=..., label=...``, same kinds) add metrics. Returns the
        outputs (``sct``, ``seg``, ``sct_std``, ``seg_uncertainty``) on the input's own grid and array layout
        (a SimpleITK image's is (z, y, x): ``sitk.GetImageFromArray(out["seg"])`` + ``CopyInformation``; a DICOM
        series' is (column, row, slice), slices ascending along the normal as ITK reads them),
        ``metrics``, and with ``output_dir`` the written ``paths``."""
        sitk_layout = type(mr).__module__.startswith("SimpleITK")
        if output_dir is not None:
            check_output_dir(output_dir)
        self.setup()
        given = _in_memory_item(mr, affine, case, item)
        t_read = time.perf_counter()
        it = self.read_dicom_inputs(given)
        t_read = time.perf_counter() - t_read
        name = it["name"]
        with tqdm(total=None, desc=f"{name} slice passes", unit="img", leave=False, disable=None if self.progress else True) as bar:
            out, _, metrics, _ = self.predict_item(it, progress=bar)
        result: dict[str, Any] = dict(out)
        result["seg"] = np.rint(out["seg"]).astype(np.uint8)
        if output_dir is not None:
            ref = None if isinstance(it["mr"], str) else it["mr"]
            written = self.write(name, it, out, output_dir, metrics, ref, source=given, timings={"read_dicom": t_read})
            result["paths"] = {k: str(v) for k, v in written.items()}
        if sitk_layout:
            result = {k: np.ascontiguousarray(np.transpose(v, (2, 1, 0))) if isinstance(v, np.ndarray) else v
                      for k, v in result.items()}
        result["metrics"] = metrics
        return result

    def run(self, input_dir: str | os.PathLike | None = None, datalist: Any = None, section: str = "test",
            pattern: str = "*.nii*", output_dir: str | os.PathLike | None = None, save_outputs: bool = True,
            raise_on_failure: bool = True, skip_existing: bool = False, num_workers: int = 0,
            summary_path: str | os.PathLike | None = None, done_cases: Sequence[str] | None = None,
            on_case: Any = None) -> dict[str, Any]:
        """Every case of ``datalist[section]`` or ``input_dir``: predict, write, report. Failed cases are logged
        with their message and skipped; at the end :class:`CaseFailures` is raised if any failed (non-zero exit
        of ``python -m monai.bundle run``).

        Under ``torch.distributed`` (torchrun, ``multi_gpu_inference.json``) the cases are dealt to the ranks in
        turn (``cases[rank::world_size]``: each case runs exactly once) and every rank's results and failures
        are gathered: each rank returns the whole run's result and only rank 0 writes ``summary_path`` and
        raises :class:`CaseFailures`.

        Args:
            skip_existing: skip (and report) a case whose complete output set is in ``output_dir`` already, or
                that is in ``done_cases`` (evaluation: a row in its CSV); resumes an interrupted cohort.
            num_workers: DataLoader worker processes for reading and preprocessing (0: in this process).
            summary_path: a JSON of done, skipped and failed cases (and which rank ran each), written atomically.
            on_case: called as ``on_case(case, {"paths", "metrics"})`` after each finished case (the evaluation
                writes its CSV as it goes).

        Returns ``{"cases": {name: {"paths", "metrics"}}, "failed": {name: message}, "skipped": [names],
        "ranks": {rank: [names it ran]}}``.
        """
        from mtl_med.errors import ConfigError

        items = list_cases(input_dir, datalist, section, pattern)
        out_root = Path(output_dir if output_dir is not None else self.output_dir).expanduser().resolve()
        skip_existing, num_workers = as_bool(skip_existing, "skip_existing"), int(num_workers)
        if num_workers < 0:
            raise ConfigError("num_workers", f"must be 0 or more, got {num_workers}")
        rank, world = rank_world()
        if save_outputs:
            check_output_dir(out_root)  # before the checkpoint is read or anything runs
        mine, skipped = self._my_cases(items, rank, world, out_root if save_outputs else None,
                                       skip_existing, done_cases)
        where = f" (rank {rank} of {world}: {len(mine)} case(s))" if world > 1 else ""
        logger.info("%d case(s) from %s%s; %d posterior samples (%s mode) on %s; outputs in %s", len(items),
                    datalist or input_dir, where, self.num_samples, self.inference_mode, self.device, out_root)
        for case in skipped:
            logger.info("case %s skipped: its outputs exist (skip_existing)", case)
        self.setup()
        done, failed = self._run_cases(mine, num_workers, out_root if save_outputs else None, on_case)
        logger.info("%d case(s) done, %d skipped, %d failed%s", len(done), len(skipped), len(failed),
                    f" on rank {rank}" if world > 1 else "")
        res = {"cases": done, "failed": failed, "skipped": skipped, "ranks": {rank: list(done) + list(failed)}}
        if world > 1:  # every rank's results, so that one summary and one failure report cover the run
            res = gather_results(res, items)
        if summary_path and rank == 0:
            _write_summary(res, len(items), world, summary_path)
        if res["failed"] and raise_on_failure and rank == 0:
            raise CaseFailures(res["failed"], len(items))
        return res

    def _my_cases(self, items: Sequence[Mapping[str, Any]], rank: int, world: int, out_root: Path | None,
                  skip_existing: bool, done_cases: Sequence[str] | None) -> tuple[list, list[str]]:
        """This rank's share of ``items`` to run, and the names of those it skips (``skip_existing``: its
        outputs are complete in ``out_root``, None when nothing is saved, or it is in ``done_cases``)."""
        mine = my_share(items, rank, world)
        if not skip_existing:  # this rank's share only: other ranks may be writing theirs already
            return mine, []

        def finished(name: str) -> bool:
            if done_cases is not None and name not in done_cases:
                return False
            return self.complete(name, out_root) if out_root is not None else done_cases is not None

        skipped = [x["name"] for x in mine if finished(x["name"])]
        return [x for x in mine if x["name"] not in skipped], skipped

    def _run_cases(self, mine: Sequence[Mapping[str, Any]], num_workers: int, out_root: Path | None,
                   on_case: Any) -> tuple[dict[str, Any], dict[str, str]]:
        """Predict (and, with ``out_root``, write) every case; one failure does not stop the others."""
        done: dict[str, Any] = {}
        failed: dict[str, str] = {}
        bar = tqdm(total=len(mine), desc="cases", unit="case", disable=None if self.progress else True)
        t_wait = time.perf_counter()
        for item, loaded, data, error in prepared_cases(self, mine, num_workers):
            # reading + preprocessing in this process, or (num_workers > 0) the wait for a worker's case
            waited = {"read_and_preprocess" if num_workers <= 0 else "waiting_for_workers": time.perf_counter() - t_wait}
            case = item["name"]
            bar.set_postfix_str(case)
            try:
                if error is not None:
                    raise error
                done[case] = self._run_case(case, item, loaded, data, out_root, waited)
                if on_case is not None:
                    on_case(case, done[case])
                if done[case]["metrics"]:
                    logger.info("%s: %s", case, format_metrics(done[case]["metrics"]))
                    tqdm.write(f"{case}: {format_metrics(done[case]['metrics'])}")
            except Exception as err:  # one bad case must not stop the others
                failed[case] = _failure_message(err, item)
                logger.error("case %s failed: %s", case, failed[case])
                logger.debug("traceback of %s", case, exc_info=True)
            bar.update(1)
            t_wait = time.perf_counter()
        bar.close()
        return done, failed

    def _run_case(self, case: str, item: Mapping[str, Any], loaded: Mapping[str, Any], data: Any,
                  out_root: Path | None, waited: Mapping[str, float]) -> dict[str, Any]:
        passes = tqdm(total=None, desc=f"{case} slice passes", unit="img", leave=False,
                      disable=None if self.progress else True)
        with passes:
            out, _, metrics, _ = self.predict_item(loaded, progress=passes, data=data)
        paths = self.write(case, loaded, out, out_root, metrics, source=item, timings=waited) if out_root is not None else {}
        return {"paths": {k: str(v) for k, v in paths.items()}, "metrics": metrics}


def _in_memory_item(mr: Any, affine: Any, case: str | None, item: Mapping[str, Any]) -> dict[str, Any]:
    """The datalist item of :meth:`VolumePredictor.predict_case`'s inputs: paths resolved, the rest MetaTensors."""
    if isinstance(mr, (str, os.PathLike)):
        mr_in: Any = str(Path(mr).expanduser().resolve())
        name = case or case_names([mr_in])[0]
    else:
        mr_in = as_metatensor(mr, affine, name="<in-memory MR>")
        name = case or "case"
    return {"name": name, "mr": mr_in,
            **{k: (str(v) if isinstance(v, (str, os.PathLike)) else as_metatensor(v, name=f"<in-memory {k}>"))
               for k, v in item.items()}}


def _failure_message(err: Exception, item: Mapping[str, Any]) -> str:
    msg = str(err) if isinstance(err, InputError) else f"{type(err).__name__}: {err}"
    if not isinstance(err, InputError) and not str(item["mr"]) in msg:
        msg = f"{item['mr']}: {msg}"
    return msg


def _write_summary(res: Mapping[str, Any], num_cases: int, world: int, path: str | os.PathLike) -> None:
    from mtl_med.io import atomic_write_json

    atomic_write_json({"num_cases": num_cases, "world_size": world, "done": list(res["cases"]),
                       "skipped": res["skipped"], "failed": res["failed"],
                       "ranks": {str(r): v for r, v in res["ranks"].items()}}, path)
