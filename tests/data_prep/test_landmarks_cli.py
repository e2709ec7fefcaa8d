import numpy as np
import pytest

from data_prep import landmarks
from mtl_med.pelvis.phantoms import generate_dataset
from mtl_med.transforms import learn_from_datalist, load_landmarks


def test_learn_landmarks_command(tmp_path, capsys, caplog):
    generate_dataset(tmp_path / "p", 3, seed=2, val_fraction=0.0, test_fraction=0.0)
    out = tmp_path / "lm.json"
    cache = tmp_path / "n4"
    rc = landmarks.main(["--datalist", str(tmp_path / "p/datalist.json"), "--out", str(out), "--n4-shrink", "2",
                         "--n4-cache", str(cache), "--quiet"])
    assert rc == 0 and "wrote landmarks" in capsys.readouterr().out
    info = load_landmarks(out, modality="mr")
    assert info["num_images"] == 3 and np.all(np.diff(info["landmarks"]) > 0)
    assert len(list(cache.glob("*.npy"))) == 3  # N4 fields cached for training
    # a second run refuses the existing file unless --overwrite (no N4 there: the refusal comes first anyway)
    first = out.read_bytes()
    again = ["--datalist", str(tmp_path / "p/datalist.json"), "--out", str(out), "--no-n4", "--quiet"]
    with pytest.raises(SystemExit) as e:
        landmarks.main(again)
    assert e.value.code == 2 and capsys.readouterr().err == (
        f"python -m data_prep.landmarks: error: {out}: output file exists; pass --overwrite to replace it\n")
    assert out.read_bytes() == first
    assert landmarks.main(again + ["--overwrite"]) == 0
    assert f"{out}: --overwrite: the existing file is replaced" in caplog.text
    assert out.read_bytes() != first  # learned without N4 this time


def test_landmarks_command_errors(tmp_path, capsys):
    rc = landmarks.main(["--datalist", str(tmp_path / "none.json"), "--out", str(tmp_path / "lm.json")])
    assert rc == 1 and "none.json: datalist file does not exist" in capsys.readouterr().err
    assert not (tmp_path / "lm.json").exists()
    try:
        landmarks.main(["--datalist", "x.json"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("missing --out must be a usage error")


def test_learn_from_datalist_re_exported_for_existing_scripts():
    assert landmarks.learn_from_datalist is learn_from_datalist
