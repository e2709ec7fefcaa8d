"""What the posterior draws of an SFG-HighResNet checkpoint do to its answer: the modal network, every single
kernel moved out of its most probable group, and independent draws against the mean of those draws.

Section 5 of the SFG paper averages 50 stochastic passes. The average is only as good as the draws: a kernel
whose grouping is confident (most probable group p near 1) is almost never drawn elsewhere in training, so the
layers after it never learn to read it in another stream; at test time the same rare draw still happens, and over
many kernels the rare draws add up. This script measures that on one case, through the bundle's own
preprocessing, sampler and Table 2 metrics (on the common grid):

1. the modal network (every kernel in its most probable group; the bundle's ``inference_mode="argmax"``);
2. with ``--scan``: every kernel of every SFG layer moved, alone, to each of its other groups (the rest modal),
   with the probability p of that group: which moves break the synthetic CT or the labels, and how often a
   posterior draw makes a harmful one;
3. ``--draws`` independent posterior draws of the whole volume, each scored alone, and their mean synthetic CT
   (the bundle's rule: the mean of the network's outputs, then clipped to the CT range) and modal labels: how
   many draws equal the modal network, and what the others cost;
4. ``--slice-draws``: the bundle's own sampler (every slice its own draws, as inference makes them) with that
   many passes, its answer, and the range of every slice draw's synthetic CT before the clip: a draw far outside
   the CT range moves the mean by (its excess) / passes.

    OMP_NUM_THREADS=1 python benchmarks/sfg_draws.py --scan --draws 50 --slice-draws 50     # the demo weights
    OMP_NUM_THREADS=1 python benchmarks/sfg_draws.py --ckpt run/model.pt --landmarks run/landmarks.json --scan --draws 50 --slice-draws 50

The case is a generated phantom (``--seed``, default the main job's) unless ``--mr`` (and ``--ct``, ``--label``,
``--bone``) name one. Prints a table; ``--json`` keeps every number.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads libgomp: no spin-waits on a shared CPU

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from mtl_med.pelvis.phantoms import PRESETS, generate_phantom, write_phantom  # noqa: E402
from mtl_med.errors import InputError  # noqa: E402
from mtl_med.inference.bundle import Predictor, default_bundle  # noqa: E402
from mtl_med.sharing.sfg.layers import StochasticFilterGroups  # noqa: E402
from mtl_med.pelvis import CT_SCALE, NUM_LABELS, SCT_TASK  # noqa: E402

KEYS = ("mae_overall", "psnr_overall", "dice_mean")


def sfg_layers(network: torch.nn.Module) -> list[tuple[str, StochasticFilterGroups]]:
    return [(n, m) for n, m in network.named_modules() if isinstance(m, StochasticFilterGroups) and m.learnable]


class Scorer:
    """One case preprocessed once; ``maps(assignment)`` runs one pass of every slice with those fixed groups and
    ``metrics(maps)`` scores it."""

    def __init__(self, predictor, item):
        self.pred, self.item = predictor, item
        self.data = predictor.preprocess(item)
        self.layers = sfg_layers(predictor.network)
        self.p = {n: m.probabilities.detach().cpu() for n, m in self.layers}
        self.modal = {n: p.argmax(-1) for n, p in self.p.items()}

    def maps(self, assignment: dict[str, torch.Tensor], clip: bool = True) -> dict[str, torch.Tensor]:
        """One pass; ``clip=False`` keeps the synthetic CT outside the CT range (HU)."""
        for n, m in self.layers:
            m.fix(assignment[n])
        saved = self.pred.maps.ct_clip
        self.pred.maps.ct_clip = saved if clip else (-math.inf, math.inf)
        try:
            return self.pred.sample(self.data, None)
        finally:
            self.pred.maps.ct_clip = saved
            for _, m in self.layers:
                m.fix(None)

    def metrics(self, maps) -> dict[str, float]:
        m = self.pred.metrics(self.data, maps, self.item)
        return {k: float(m[k]) for k in KEYS if k in m}


def scan(scorer: Scorer, modal: dict[str, float], progress: bool, layers=None) -> list[dict]:
    rows = []
    moves = [(n, k, g) for n, p in scorer.p.items() if layers is None or n in layers
             for k in range(p.shape[0]) for g in range(p.shape[1]) if g != int(scorer.modal[n][k])]
    for n, k, g in tqdm(moves, desc="single-kernel moves", disable=not progress):
        a = {m: v.clone() for m, v in scorer.modal.items()}
        a[n][k] = g
        r = scorer.metrics(scorer.maps(a))
        rows.append({"layer": n, "kernel": k, "from": int(scorer.modal[n][k]), "to": g, "p": float(scorer.p[n][k, g]), **r,
                     "d_mae": r["mae_overall"] - modal["mae_overall"], "d_dice": r["dice_mean"] - modal["dice_mean"]})
    return rows


def draws(scorer: Scorer, n: int, seed: int, progress: bool) -> tuple[list[dict], dict[str, float]]:
    g = torch.Generator().manual_seed(seed)
    rows, sct_sum, votes = [], None, None
    for d in tqdm(range(n), desc="posterior draws", disable=not progress):
        a = {name: torch.multinomial(p, 1, generator=g).squeeze(1) for name, p in scorer.p.items()}
        moved = [f"{name}[{k}] {int(scorer.modal[name][k])}->{int(a[name][k])}"
                 for name in a for k in torch.nonzero(a[name] != scorer.modal[name]).flatten().tolist()]
        maps = scorer.maps(a, clip=False)
        raw = maps["sct"]
        maps = {**maps, "sct": raw.clamp(*scorer.pred.ct_clip)}
        rows.append({"draw": d, "moved": moved, **scorer.metrics(maps), "raw_hu": [float(raw.min()), float(raw.max())]})
        sct_sum = raw.double() if sct_sum is None else sct_sum + raw.double()
        onehot = torch.nn.functional.one_hot(maps["seg"].long(), NUM_LABELS)
        votes = onehot if votes is None else votes + onehot
    mean = scorer.metrics({"sct": (sct_sum / n).clamp(*scorer.pred.ct_clip).float(), "seg": votes.argmax(-1)})
    return rows, mean


def slice_draws(scorer: Scorer, predictor, seed: int) -> dict:
    """The bundle's sampler over the case (``predictor``: the same bundle with S passes), recording the range of
    every slice draw's synthetic CT before the clip (HU)."""
    ranges = []

    def forward(network, batch, generator):
        out = network(batch, generator=generator)
        s = (out[SCT_TASK].flatten(1).float() - 1.0) * CT_SCALE  # A.3: HU = 1024 (x - 1)
        ranges.extend(zip(s.amin(1).tolist(), s.amax(1).tolist()))
        return out

    predictor.sampler.forward = forward  # the dense path, each copy its own draw
    predictor.seed = seed
    r = scorer.metrics(predictor.sample(scorer.data, None))
    lo, hi = predictor.ct_clip
    width = hi - lo
    far = [x for x in ranges if x[0] < lo - width or x[1] > hi + width]
    return {**r, "passes": predictor.num_samples, "slice_draws": len(ranges), "far_outside": len(far),
            "extreme_hu": max((max(abs(a), abs(b)) for a, b in ranges), default=math.nan), "ct_range": [lo, hi]}


def summary(result: dict) -> None:
    modal, mean = result["modal"], result.get("mean_of_draws")
    layers = ", ".join(f"{n} ({k})" for n, k in result["sfg_layers"].items())
    print(f"\n{result['case']}: {result['kernels']} SFG kernels in {len(result['sfg_layers'])} layers [{layers}]; "
          f"P(a draw is the modal network) = {result['p_modal_draw']:.3f}")
    print("| answer | MAE (HU) | PSNR (dB) | Dice |\n| --- | --- | --- | --- |")
    print(f"| modal network (argmax) | {modal['mae_overall']:.1f} | {modal['psnr_overall']:.2f} | {modal['dice_mean']:.3f} |")
    if mean is not None:
        print(f"| mean of {len(result['draws'])} draws | {mean['mae_overall']:.1f} | {mean['psnr_overall']:.2f} | {mean['dice_mean']:.3f} |")
    if result.get("scan"):
        rows, tol = result["scan"], result["harm_hu"]
        harm = [r for r in rows if r["d_mae"] > tol]
        print(f"\nsingle-kernel moves: {len(rows)}; {len(harm)} raise the MAE by more than {tol:g} HU "
              f"(median p of those groups {_median([r['p'] for r in harm]):.4f}); P(a draw makes at least one) = "
              f"{result['p_harmful_draw']:.3f}")
        print("| layer[kernel] from -> to | p | MAE (HU) | Dice |\n| --- | --- | --- | --- |")
        for r in sorted(rows, key=lambda r: -r["d_mae"])[:10]:
            print(f"| {r['layer']}[{r['kernel']}] {r['from']} -> {r['to']} | {r['p']:.4f} | {r['mae_overall']:.1f} | {r['dice_mean']:.3f} |")
    if result.get("slice_draws"):
        s = result["slice_draws"]
        print(f"\nthe bundle's sampler, {s['passes']} passes of every slice: MAE {s['mae_overall']:.1f} HU, PSNR "
              f"{s['psnr_overall']:.2f} dB, Dice {s['dice_mean']:.3f}; {s['far_outside']} of {s['slice_draws']} slice draws "
              f"leave the CT range {s['ct_range']} by more than its width, the most extreme at {s['extreme_hu']:.0f} HU")
    if result.get("draws"):
        d = result["draws"]
        same = [r for r in d if not r["moved"]]
        other = [r for r in d if r["moved"]]
        print(f"\ndraws: {len(same)} of {len(d)} are the modal network; the other {len(other)}: MAE median "
              f"{_median([r['mae_overall'] for r in other]):.1f} HU, max {max((r['mae_overall'] for r in other), default=math.nan):.1f} HU; "
              f"{sum(r['mae_overall'] > modal['mae_overall'] + result['harm_hu'] for r in d)} draws more than "
              f"{result['harm_hu']:g} HU worse than the modal network; synthetic CT before the clip within "
              f"[{min(r['raw_hu'][0] for r in d):.0f}, {max(r['raw_hu'][1] for r in d):.0f}] HU")


def _median(v):
    return float(torch.tensor(v, dtype=torch.float64).median()) if v else math.nan


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=None, help="bundle folder (default: the flagship)")
    ap.add_argument("--config", nargs="+", default=None,
                    help="config files merged over configs/inference.json (default: the bundle's configs/demo.json)")
    ap.add_argument("--ckpt", default=None, help="checkpoint (default: the bundle's ckpt_path)")
    ap.add_argument("--landmarks", default=None, help="histogram landmarks of the checkpoint's training (default: the bundle's)")
    ap.add_argument("--mr", default=None, help="MR of the case (default: a generated phantom)")
    ap.add_argument("--ct", default=None)
    ap.add_argument("--label", default=None)
    ap.add_argument("--bone", default=None)
    ap.add_argument("--seed", type=int, default=None, help="phantom seed (default: the main job's)")
    ap.add_argument("--preset", default="medium")
    ap.add_argument("--scan", action="store_true", help="move every kernel alone to each of its other groups")
    ap.add_argument("--layers", nargs="+", default=None, help="scan only these SFG layers (module names, as printed)")
    ap.add_argument("--draws", type=int, default=0, help="independent posterior draws (section 5: 50)")
    ap.add_argument("--slice-draws", type=int, default=0, help="passes of the bundle's own sampler (section 5: 50)")
    ap.add_argument("--draw-seed", type=int, default=0)
    ap.add_argument("--harm-hu", type=float, default=50.0, help="a move or draw is harmful above this MAE increase")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-progress", action="store_true")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from records import add_record_arguments

    add_record_arguments(ap)
    args = ap.parse_args(argv)
    if args.draws < 0 or args.slice_draws < 0:
        ap.error("--draws and --slice-draws must be >= 0")
    bundle = Path(args.bundle) if args.bundle else default_bundle()
    configs = [bundle / "configs" / "inference.json", *(args.config or [bundle / "configs" / "demo.json"])]
    over = {"num_samples": 1, "engine": "auto", "compute_dtype": "float32", "progress": False}  # the bundle's device
    if args.ckpt:
        over["ckpt_path"] = str(Path(args.ckpt).resolve())
    if args.landmarks:
        over["landmarks_path"] = str(Path(args.landmarks).resolve())
    pred = Predictor(bundle, [str(c) for c in configs], **over)
    names = [n for n, _ in sfg_layers(pred.network)]
    if not names:
        ap.error("the bundle's network has no learned SFG layer (sharing 'sfg', grouping 'sfg')")
    unknown = sorted(set(args.layers or ()) - set(names))
    if unknown:
        ap.error(f"--layers {unknown}: not SFG layers of this network; it has {names}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.mr is None:
            from mtl_med.demo import DEMO_SEED

            seed = DEMO_SEED if args.seed is None else args.seed
            paths = write_phantom(generate_phantom(seed, shape=PRESETS[args.preset]), Path(tmp))
            item, case = {"name": "phantom", **{k: paths[k] for k in ("mr", "ct", "label", "bone")}}, f"phantom seed {seed}"
        else:
            item = {"name": Path(args.mr).name, "mr": args.mr, **{k: getattr(args, k) for k in ("ct", "label", "bone") if getattr(args, k)}}
            case = args.mr
        item = {k: str(v) for k, v in item.items()}
        t0 = time.perf_counter()
        for key in ("mr", "ct", "label", "bone"):
            if key in item and not Path(item[key]).exists():
                ap.error(f"{item[key]}: --{key} file does not exist")
        try:
            scorer = Scorer(pred, item)
        except InputError as err:  # unreadable or unusable input: one line naming the file
            ap.error(str(err))
        modal = scorer.metrics(scorer.maps(scorer.modal))
        result = {"case": case, "ckpt": str(pred.ckpt_path), "sfg_layers": {n: p.shape[0] for n, p in scorer.p.items()},
                  "kernels": sum(p.shape[0] for p in scorer.p.values()), "harm_hu": args.harm_hu, "modal": modal,
                  "p_modal_draw": float(math.prod(float(p.max(-1).values.prod()) for p in scorer.p.values()))}
        if args.scan:
            result["scan"] = scan(scorer, modal, not args.no_progress, args.layers)
            harmful = {(r["layer"], r["kernel"], r["to"]) for r in result["scan"] if r["d_mae"] > args.harm_hu}
            # P(no harmful move) = prod over the scanned kernels of (1 - p of their harmful groups): kernels draw
            # independently; a draw moving two kernels can harm where neither move does alone (not counted)
            safe = math.prod(1.0 - sum(float(scorer.p[n][k, g]) for g in range(scorer.p[n].shape[1]) if (n, k, g) in harmful)
                             for n in scorer.p if args.layers is None or n in args.layers for k in range(scorer.p[n].shape[0]))
            result["p_harmful_draw"] = 1.0 - safe
        if args.draws:
            result["draws"], result["mean_of_draws"] = draws(scorer, args.draws, args.draw_seed, not args.no_progress)
        if args.slice_draws:
            result["slice_draws"] = slice_draws(scorer, Predictor(bundle, [str(c) for c in configs], **{**over, "num_samples": args.slice_draws}), args.draw_seed)
        result["seconds"] = time.perf_counter() - t0
    summary(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    if args.record:
        from records import run_config, tagged, write_record

        name = Path(args.ckpt).parent.name if args.ckpt else "demo_weights"
        write_record("sfg_draws", tagged(args, f"{name}_seed{args.seed if args.seed is not None else 'main'}"),
                     config=run_config(args, drop=("json", "record", "record_tag", "no_progress")), seed=args.seed,
                     metrics={k: v for k, v in result.items() if k != "seconds"}, timings={"seconds": result.get("seconds")})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
