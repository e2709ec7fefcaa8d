"""The flagship training driver's bookkeeping: the validation curve read back from the bundle's TensorBoard
events, the plateau rule that ends training, and a record that refuses to mix two protocols."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def driver(load_benchmark):
    return load_benchmark("flagship_training")


def test_validation_curve_reads_every_run_of_the_log_dir(driver, tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    # two training chunks append to one log dir, as resumed runs of train.json do
    for epochs in ((10, 20), (30, 40)):
        w = SummaryWriter(log_dir=str(tmp_path))
        for e in epochs:
            w.add_scalar("val_dice", e / 100, e)
            w.add_scalar("val_psnr", 20 + e / 10, e)
            w.add_scalar("train_loss", 1.0, e)  # not a validation tag
        w.close()
    curve = driver.validation_curve(tmp_path)
    assert set(curve) == {"val_dice", "val_psnr"}
    assert [e for e, _ in curve["val_dice"]] == [10, 20, 30, 40]
    assert [v for _, v in curve["val_dice"]] == pytest.approx([0.1, 0.2, 0.3, 0.4])


@pytest.mark.parametrize("dice, stop", [
    ([0.3, 0.5, 0.6, 0.6, 0.601, 0.602, 0.603], True),   # four chunks within 0.005 of the best before them
    ([0.3, 0.5, 0.6, 0.6, 0.601, 0.602, 0.61], False),   # the last chunk gained 0.01
    ([0.3, 0.5, 0.6, 0.6], False),                       # too few chunks to judge
    ([0.9, 0.5, 0.5, 0.5, 0.5], True),                   # a collapse after the best is a plateau too
])
def test_plateau_rule(driver, dice, stop):
    assert driver.plateaued([{"best_val_dice": d} for d in dice], patience=4, min_gain=0.005) is stop


def test_record_of_another_protocol_is_refused(driver, tmp_path):
    path = tmp_path / "training.json"
    path.write_text(json.dumps({"benchmark": "flagship_training", "config": {"seed": 0}, "chunks": [{}]}))
    assert driver.load_record(path, {"seed": 0})["chunks"] == [{}]
    with pytest.raises(SystemExit, match="another training protocol"):
        driver.load_record(path, {"seed": 1})
    assert driver.load_record(tmp_path / "new.json", {"seed": 1})["chunks"] == []


def test_resume_from_the_checkpoint_with_most_epochs(driver, tmp_path):
    import torch

    def save(name, iteration):
        torch.save({"trainer": {"iteration": iteration, "epoch_length": 51}}, tmp_path / name)

    assert driver.latest_checkpoint(tmp_path) == (None, 0)
    save("checkpoint_final.pt", 20 * 51)  # the end of the last finished chunk
    save("checkpoint_epoch=30.pt", 30 * 51)  # a later chunk stopped after its epoch-30 validation
    assert driver.latest_checkpoint(tmp_path) == (tmp_path / "checkpoint_epoch=30.pt", 30)
    save("checkpoint_final.pt", 40 * 51)
    assert driver.latest_checkpoint(tmp_path) == (tmp_path / "checkpoint_final.pt", 40)


def test_refresh_gives_each_chunk_its_own_validations(driver):
    curve = {"val_dice": [(10, 0.1), (20, 0.3), (30, 0.2), (40, 0.5)], "val_psnr_hu": [(10, 15.0), (30, 18.0)]}
    record = {"chunks": [{"to_epoch": 20}, {"to_epoch": 40}]}
    driver.refresh(record, curve)
    first, second = record["chunks"]
    assert first["val"]["val_dice"] == [0.1, 0.3] and second["val"]["val_dice"] == [0.2, 0.5]
    assert first["val"]["val_psnr_hu"] == [15.0] and second["val"]["val_mae_hu"] == []
    assert (first["best_val_dice"], second["best_val_dice"]) == (0.3, 0.5)


def test_held_out_evaluation_names_a_weights_folder_without_weights(load_benchmark, tmp_path, capsys):
    """``uncertainty.py --weights DIR`` checks the folder before it makes a phantom or writes its record."""
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "model.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as stop:
        load_benchmark("uncertainty").main(["--weights", str(tmp_path / "w"), "--json", str(tmp_path / "r.json"),
                                            "--work", str(tmp_path / "work")])
    assert stop.value.code == 2
    assert f"--weights {tmp_path / 'w'}: no landmarks.json there" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "work").exists()


@pytest.mark.parametrize("flag", ["--chunk-epochs", "--max-epochs", "--patience", "--threads"])
def test_counts_below_one_are_refused_before_any_work(driver, tmp_path, capsys, flag):
    with pytest.raises(SystemExit) as stop:
        driver.main(["--work", str(tmp_path / "work"), "--record", str(tmp_path / "r.json"), flag, "0"])
    assert stop.value.code == 2 and f"{flag} must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "work").exists() and not (tmp_path / "r.json").exists()
