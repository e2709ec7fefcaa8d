"""MONAI model-zoo conformance of the pelvis bundle: the standard bundle properties that MONAI's
``ConfigWorkflow.check_properties`` (and MONAI Label / Deploy, which read them) expect, evaluate.json over
train.json as well as over inference.json, eval_metrics, and large_files.yml."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from monai.bundle import ConfigWorkflow

from mtl_med.pelvis.phantoms import generate_phantom, write_phantom

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "sfg_highresnet_pelvis"
CONFIGS = BUNDLE / "configs"
TINY = [4, 8, 8]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("props")
    c = write_phantom(generate_phantom(3, shape=(16, 16, 4)), root / "case_0")
    item = {"mr": c["mr"], "ct": c["ct"], "label": c["label"]}
    (root / "datalist.json").write_text(json.dumps({"training": [item], "validation": [item], "test": [item]}))
    return root


def _workflow(files, kind, data, **overrides):
    n = torch.get_num_threads()
    wf = ConfigWorkflow(config_file=[str(CONFIGS / f) for f in files], workflow_type=kind, logging_file=False,
                        meta_file=str(CONFIGS / "metadata.json"), bundle_root=str(BUNDLE), features=TINY,
                        datalist=str(data / "datalist.json"), **overrides)
    wf.initialize()
    torch.set_num_threads(n)
    return wf


@pytest.mark.parametrize("files", [["inference.json"], ["train.json", "evaluate.json"],
                                   ["inference.json", "evaluate.json"]])
def test_inference_workflow_properties(files, data):
    wf = _workflow(files, "infer", data)
    assert wf.check_properties() == []
    assert len(wf.dataset) == 1 and wf.dataset.data[0]["name"] == "case_0"
    assert wf.evaluator is wf.parser.get_parsed_content("predictor")
    assert wf.evaluator.num_samples == 50  # the inference settings, also over train.json
    assert type(wf.inferer).__name__ == "SliceInferer"


def test_evaluate_json_agrees_with_inference_json():
    """evaluate.json repeats the inference ids it needs so that it also runs over train.json: the same values."""
    inf = json.loads((CONFIGS / "inference.json").read_text())
    ev = json.loads((CONFIGS / "evaluate.json").read_text())
    own = {"datalist", "datalist_section", "output_dir", "save_png", "run", "finalize", "dataset"}
    shared = [k for k in ev if k in inf and k not in own]
    assert len(shared) > 20
    for key in shared:
        assert ev[key] == inf[key], key


def test_train_workflow_properties(data, tmp_path):
    """The train workflow's properties, as train.json defines them."""
    wf = _workflow(["train.json"], "train", data, n4=False, cache=None, ckpt_dir=str(tmp_path / "models"),
                   output_dir=str(tmp_path / "runs"))
    assert wf.check_properties() == []
    assert wf.parser.get_parsed_content("dataset_dir") == str(data)
    assert wf.max_epochs == 200


def test_eval_metrics_and_large_files():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert {"psnr_overall", "mae_overall", "dice_mean"} <= set(meta["eval_metrics"])
    files = yaml.safe_load((BUNDLE / "large_files.yml").read_text())["large_files"]
    assert {f["path"] for f in files} == set(meta["demo_weights"]["files"])
    for f in files:  # the hashes MONAI checks are those of the files in the bundle
        assert hashlib.md5((BUNDLE / f["path"]).read_bytes()).hexdigest() == f["hash_val"], f["path"]


@pytest.mark.parametrize("files", [["inference.json"], ["train.json", "evaluate.json"]])
def test_sampler_settings_reach_the_posterior_sampler(data, files):
    wf = _workflow(files, "infer", data, num_samples="auto", max_samples=20, min_samples=5, regression_tol_hu=10.24,
                   label_tol=0.05, engine="dense", compute_dtype="float32")
    s = wf.parser.get_parsed_content("predictor").sampler
    assert s.adaptive and s.num_samples == 20 and s.min_samples == 5
    assert s.regression_tol == pytest.approx(0.01) and s.label_tol == 0.05  # HU over the network's CT scale
    assert (s.engine, s.dtype) == ("dense", "float32")


# Every "$..." expression of a training config may only use the mtl_med modules its "imports" load: a
# module that another test happened to import first would hide the gap in-process, so a fresh interpreter checks.
# One interpreter imports torch and MONAI (which never import mtl_med) once, then forks a child per bundle, so
# each bundle still starts with no mtl_med module loaded and the suite pays the heavy imports once.
_CHECK_IMPORTS = r"""
import json, os, re, sys
import monai, torch
assert not any(m == "mtl_med" or m.startswith("mtl_med.") for m in sys.modules)
def expressions(node):
    if isinstance(node, dict):
        for v in node.values():
            yield from expressions(v)
    elif isinstance(node, list):
        for v in node:
            yield from expressions(v)
    elif isinstance(node, str) and node.startswith("$") and not node.startswith(("$import", "$from")):
        yield node
def missing(files):
    train, *variants = (json.load(open(f)) for f in files)
    ns, out = {}, []
    for cfg in [train] + sorted(variants, key=lambda c: len(c.get("imports", []))):
        # "$import ..." items run where they stand: in "imports", or first in "initialize"
        for line in [*cfg.get("imports", []), *cfg.get("initialize", [])]:
            if isinstance(line, str) and line.startswith(("$import", "$from")):
                exec(line[1:], ns)
        for ref in sorted({r for e in expressions(cfg) for r in re.findall(r"\bmtl_med(?:\.\w+)+", e)}):
            obj = ns["mtl_med"]
            for part in ref.split(".")[1:]:
                if not hasattr(obj, part):
                    out.append(ref)
                    break
                obj = getattr(obj, part)
    return out
for bundle, files in json.loads(sys.argv[1]).items():
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        print(json.dumps({bundle: missing(files)}), flush=True)
        os._exit(0)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0, bundle
"""
BUNDLES = ["sfg_highresnet_pelvis", "vision_multitask", "dense_multitask"]


@pytest.fixture(scope="module")
def missing_imports():
    """bundle -> the mtl_med names its training configs use but do not import."""
    import subprocess
    import sys

    files = {}
    for bundle in BUNDLES:
        configs = REPO / "bundles" / bundle / "configs"
        files[bundle] = [str(configs / "train.json"), *map(str, sorted((configs / "variants").glob("*.json")))]
    out = subprocess.run([sys.executable, "-c", _CHECK_IMPORTS, json.dumps(files)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    found = {}
    for line in out.stdout.splitlines():
        if line.startswith("{"):
            found.update(json.loads(line))
    return found


@pytest.mark.parametrize("bundle", BUNDLES)
def test_training_configs_import_every_module_they_use(missing_imports, bundle):
    assert missing_imports[bundle] == []
