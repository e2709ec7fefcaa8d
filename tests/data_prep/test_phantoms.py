"""The phantoms command line (data_prep.phantoms); the generator is tested in tests/pelvis/test_phantoms.py."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import mtl_med.pelvis.phantoms as library
from data_prep import phantoms
from mtl_med.data.nifti import check_datalist

ROOT = Path(__file__).resolve().parents[2]


def _digests(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_datalist(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert phantoms.main(["--out", str(a), "--cases", "3", "--seed", "4", "--quiet"]) == 0
    assert phantoms.main(["--out", str(b), "--cases", "3", "--seed", "4", "--quiet"]) == 0
    assert phantoms.main(["--out", str(c), "--cases", "3", "--seed", "5", "--quiet"]) == 0
    da, db, dc = _digests(a), _digests(b), _digests(c)
    assert da == db
    assert da["case_000/mr.nii.gz"] != dc["case_000/mr.nii.gz"]
    assert not [n for n in da if ".tmp" in n]  # no temporary files left
    dl = check_datalist(a / "datalist.json")
    assert sum(len(v) for v in dl.values()) == 3 and len(dl["training"]) >= 1
    raw = json.loads((a / "datalist.json").read_text())
    assert raw["training"][0]["mr"].endswith("/mr.nii.gz") and not raw["training"][0]["mr"].startswith("/")


def test_command_line_entry_point(tmp_path, capsys):
    out = tmp_path / "p"
    r = subprocess.run([sys.executable, "-m", "data_prep.phantoms", "--out", str(out), "--cases", "2", "--seed", "0",
                        "--preset", "small"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "wrote 2 cases" in r.stdout and "generating case_001" in r.stderr
    good = ["--out", str(tmp_path / "q"), "--seed", "0"]
    for args in (good + ["--cases", "0"], good + ["--cases", "x"], good + ["--cases", "1", "--preset", "huge"],
                 good + ["--cases", "1", "--mr-spacing", "1,2"], ["--cases", "1", "--seed", "0"]):
        with pytest.raises(SystemExit) as e:
            phantoms.main(args)
        assert e.value.code == 2 and "usage:" in capsys.readouterr().err, args
    assert not (tmp_path / "q").exists()


def test_non_empty_output_folder_is_refused_unless_overwrite(tmp_path, capsys, caplog):
    out = tmp_path / "p"
    args = ["--out", str(out), "--cases", "2", "--shape", "24", "24", "8", "--quiet"]
    assert phantoms.main(args + ["--seed", "0"]) == 0
    before = _digests(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # another seed into the same folder would mix two runs
        phantoms.main(args + ["--seed", "1"])
    assert e.value.code == 2
    assert capsys.readouterr().err == (f"python -m data_prep.phantoms: error: {out}: output folder is not empty "
                                       "(2 cases from an earlier run); pass --overwrite to write into it anyway\n")
    assert _digests(out) == before  # nothing written, not even a temporary
    assert phantoms.main(args + ["--seed", "1", "--overwrite"]) == 0
    assert f"{out}: --overwrite: existing files of the same name are replaced" in caplog.text
    after = _digests(out)
    assert after.keys() == before.keys() and after["case_000/mr.nii.gz"] != before["case_000/mr.nii.gz"]
    (tmp_path / "empty").mkdir()  # an empty folder (made beforehand) is no earlier run
    assert phantoms.main(["--out", str(tmp_path / "empty"), "--cases", "1", "--seed", "0", "--shape", "8", "8", "4",
                          "--quiet"]) == 0


def test_varied_cohort_command(tmp_path, capsys):
    args = ["--cases", "6", "--seed", "2", "--shape", "24", "24", "8", "--quiet"]
    assert phantoms.main(["--out", str(tmp_path / "v"), "--varied", *args]) == 0
    raw = json.loads((tmp_path / "v" / "datalist.json").read_text())
    var = raw["variations"]
    assert set(var) == {f"case_{i:03d}" for i in range(6)} and "varied" in raw["description"]
    assert var == {f"case_{i:03d}": {**library.varied_phantom_kwargs([2, i, 1]), **{k: var[f"case_{i:03d}"][k]
                   for k in ("spacing", "mr_spacing", "ct_spacing")}} for i in range(6)}
    assert len({v["body_scale"] for v in var.values()}) == 6
    # an option given explicitly fixes that property for every case; the others still vary
    assert phantoms.main(["--out", str(tmp_path / "f"), "--varied", "--orientation", "LPS", "--oblique", "0", *args]) == 0
    fixed = json.loads((tmp_path / "f" / "datalist.json").read_text())["variations"]
    assert {v["orientation"] for v in fixed.values()} == {"LPS"} and {v["oblique_deg"] for v in fixed.values()} == {0.0}
    assert [v["body_scale"] for v in fixed.values()] == [v["body_scale"] for v in var.values()]
    # without --varied: the defaults, no "variations" (the same bytes as before the option existed)
    assert phantoms.main(["--out", str(tmp_path / "d"), *args]) == 0
    assert "variations" not in json.loads((tmp_path / "d" / "datalist.json").read_text())
    with pytest.raises(SystemExit) as e:
        phantoms.main(["--out", str(tmp_path / "x"), "--body-scale", "3", *args])
    assert e.value.code == 2 and "--body-scale" in capsys.readouterr().err
