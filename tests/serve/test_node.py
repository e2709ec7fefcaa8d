"""The DICOM node (``mtl-med serve``, :mod:`mtl_med.serve`) against a real PACS (Orthanc, conftest.py): Orthanc
sends a phantom MR series to the node by C-STORE, the node runs the bundle's inference (a tiny random-initialised
network) and sends the synthetic CT series, SEG and RTSTRUCT back to Orthanc, where the tests read them through
its REST API. Also: a node killed with SIGKILL mid-job and restarted (exactly one result), a calling AE title off
the allow-list, two studies at once, a series the bundle refuses, a destination that is down, and the stored
files against dciodvfy.

Every wait is bounded and names what it waited for; no assertion is on a time."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from mtl_med.serve import Destination, Node, NodeConfig

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "sfg_highresnet_pelvis"
VERIFICATION = "1.2.840.10008.1.1"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
DCIODVFY = shutil.which("dciodvfy")
JOB_TIMEOUT_S = 90  # receive + quiet time + inference + send of one 32 x 32 x 8 series on a busy 2-core CPU
RESULT_MODALITIES = ("CT", "SEG", "RTSTRUCT")


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_config(orthanc, work: Path, overrides: dict, **kw) -> NodeConfig:
    base = dict(port=orthanc.node_ports["mtlnode"], ae_title="MTLNODE", bind="127.0.0.1",
                destination=Destination("ORTHANC", "127.0.0.1", orthanc.dicom_port), work_dir=work,
                allow=["ORTHANC"], quiet_seconds=1.0, send_attempts=3, send_backoff=0.2, timeout=20.0,
                bundle=BUNDLE, overrides=dict(overrides))
    base.update(kw)
    return NodeConfig(**base)


class RunningNode:
    """A node serving in a thread of this process (the test process has torch and MONAI imported already)."""

    def __init__(self, cfg: NodeConfig):
        self.node = Node(cfg).open()
        self.thread = threading.Thread(target=self.node.serve_forever, name="node-worker", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.node.request_stop()
        self.thread.join(timeout=120)
        self.node.close()

    def log(self) -> str:
        return (self.node.work / "node.log").read_text()


@pytest.fixture(scope="module")
def node(orthanc, tiny_bundle, tmp_path_factory):
    """The node Orthanc knows as ``mtlnode``, serving in this process."""
    running = RunningNode(_node_config(orthanc, tmp_path_factory.mktemp("node"), tiny_bundle))
    yield running
    running.close()


def _headers(files) -> pydicom.Dataset:
    return pydicom.dcmread(files[0], stop_before_pixels=True)


def _record(work: Path, series_uid: str, state: str) -> dict | None:
    for p in sorted((work / "queue" / state).glob("*.json")):
        rec = json.loads(p.read_text())
        if rec.get("series_uid") == series_uid:
            return rec
    return None


def _queue_listing(work: Path) -> str:
    return "queue: " + json.dumps({s: sorted(p.name for p in (work / "queue" / s).glob("*.json"))
                                   for s in ("pending", "running", "done", "failed")})


def _results(orthanc, study_uid: str) -> dict[str, list[dict]]:
    """Orthanc's series of the study by modality."""
    out: dict[str, list[dict]] = {}
    for s in orthanc.series_of_study(study_uid):
        out.setdefault(s["MainDicomTags"].get("Modality"), []).append(s)
    return out


def _wait_done(waiter, work: Path, series_uid: str, timeout: float = JOB_TIMEOUT_S, log=None) -> dict:
    def diagnose():
        tail = "\n".join((log() if log else (work / "node.log").read_text()).splitlines()[-15:])
        return f"{_queue_listing(work)}\nnode log:\n{tail}"

    return waiter(lambda: _record(work, series_uid, "done") or _fail_early(work, series_uid), timeout,
                  f"series {series_uid} in {work}/queue/done/", diagnose=diagnose)


def _fail_early(work: Path, series_uid: str):
    rec = _record(work, series_uid, "failed")
    if rec is not None:
        pytest.fail(f"the job of series {series_uid} failed: {rec.get('error')}")
    return None


# ----------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def e2e(orthanc, node, make_series, tmp_path_factory, waiter):
    """One MR series uploaded to Orthanc and sent by Orthanc to the node; the node's done record and what Orthanc
    holds for the study once the results are there."""
    root = tmp_path_factory.mktemp("e2e")
    files = make_series(root / "mr", seed=11)
    mr = _headers(files)
    t0 = time.monotonic()
    sid = orthanc.upload_folder(root / "mr")
    orthanc.store("mtlnode", sid)
    t_sent = time.monotonic()
    rec = _wait_done(waiter, node.node.work, mr.SeriesInstanceUID, log=node.log)
    results = waiter(lambda: (r := _results(orthanc, mr.StudyInstanceUID)) and all(m in r for m in RESULT_MODALITIES)
                     and r, 30, "the CT, SEG and RTSTRUCT series in Orthanc")
    return {"root": root, "mr_folder": root / "mr", "mr": mr, "record": rec, "results": results,
            "store_seconds": t_sent - t0, "wall_seconds": time.monotonic() - t0}


def test_end_to_end_results_in_pacs(e2e, orthanc, tiny_bundle, ct_hu, record_property):
    """Orthanc -> node -> Orthanc: one CT series (one slice per MR slice), one SEG and one RTSTRUCT in the MR's
    study and frame of reference, the CT's HU those of the bundle's file writer run directly on the same series
    with the same settings."""
    from mtl_med.inference import Predictor

    mr, res, rec = e2e["mr"], e2e["results"], e2e["record"]
    assert {m: len(v) for m, v in res.items()} == {"MR": 1, "CT": 1, "SEG": 1, "RTSTRUCT": 1}
    ct = res["CT"][0]
    assert len(ct["Instances"]) == 8 and rec["instances"] == 8
    for modality in RESULT_MODALITIES:
        tags = orthanc.tags(res[modality][0]["Instances"][0])
        assert tags["StudyInstanceUID"] == mr.StudyInstanceUID, modality
        assert tags["PatientID"] == mr.PatientID, modality
        if modality == "RTSTRUCT":
            frames = [item["FrameOfReferenceUID"] for item in tags["ReferencedFrameOfReferenceSequence"]]
            assert frames == [mr.FrameOfReferenceUID]
        else:
            assert tags["FrameOfReferenceUID"] == mr.FrameOfReferenceUID, modality
    assert len({orthanc.tags(i)["SeriesInstanceUID"] for i in ct["Instances"]}) == 1

    # the same series through the bundle's Python entry, same settings and seed: the CT file writer's HU
    direct = Predictor(BUNDLE, **{**tiny_bundle, "dicom_outputs": ["ct"]}).predict_case(
        e2e["mr_folder"], output_dir=e2e["root"] / "direct", case="direct")
    want = ct_hu(pydicom.dcmread(p) for p in sorted(Path(direct["paths"]["dicom_ct"]).glob("*.dcm")))
    got = ct_hu(pydicom.dcmread(io.BytesIO(orthanc.file(i))) for i in ct["Instances"])
    assert sorted(got) == sorted(want)
    diff = max(float(np.abs(got[k] - want[k]).max()) for k in want)
    assert diff <= 0.5, f"sCT in Orthanc differs from the file writer's by up to {diff} HU"
    assert np.ptp(np.concatenate([v.ravel() for v in got.values()])) > 0  # not a blank image

    times = {"receive_s": rec["receive_seconds"], "infer_s": rec["infer_seconds"], "send_s": rec["send_seconds"],
             "orthanc_store_call_s": round(e2e["store_seconds"], 2),
             "upload_to_results_s": round(e2e["wall_seconds"], 2)}
    for k, v in times.items():
        record_property(k, v)
    print(f"\nDICOM node end to end (32 x 32 x 8 MR, 8 instances in, {len(rec['files'])} out): {times}; "
          f"largest HU difference to the file writer {diff}")


# ----------------------------------------------------------------------------------------------- SIGKILL
def _start_node_process(orthanc, work: Path, overrides: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mtl_med.serve", "--port", str(orthanc.node_ports["mtlkill"]), "--ae-title",
           "MTLKILL", "--bind", "127.0.0.1", "--destination", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
           "--work-dir", str(work), "--allow", "ORTHANC", "--quiet-seconds", "1", "--send-backoff", "0.2",
           "--bundle", str(BUNDLE)]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={json.dumps(value)}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(work / "stderr.txt", "ab") as err:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env, cwd=REPO)


def _wait_listening(proc, work: Path, waiter, starts: int) -> None:
    def ready():
        if proc.poll() is not None:
            pytest.fail(f"the node exited with code {proc.returncode}:\n{(work / 'stderr.txt').read_text()[-3000:]}")
        log = work / "node.log"
        return log.is_file() and log.read_text().count(" listening on ") >= starts

    waiter(ready, 120, "the node process to listen", poll=0.2)


def test_killed_node_resumes_exactly_once(orthanc, tiny_bundle, make_series, tmp_path, waiter):
    """The node process is killed (SIGKILL: no handler runs) while its job is in running/; a node started again on
    the same work dir runs the job again, and Orthanc ends with exactly one sCT series, one SEG and one RTSTRUCT
    for the study. SIGTERM then stops the restarted node with exit code 0."""
    work = tmp_path / "work"
    work.mkdir()
    files = make_series(tmp_path / "mr", seed=12)
    mr = _headers(files)
    overrides = {**tiny_bundle, "num_samples": 6}  # a job long enough to be caught in running/
    proc = _start_node_process(orthanc, work, overrides)
    try:
        _wait_listening(proc, work, waiter, 1)
        orthanc.store("mtlkill", orthanc.upload_folder(tmp_path / "mr"))
        waiter(lambda: _record(work, mr.SeriesInstanceUID, "running"), 60,
               "the job in running/", poll=0.01, diagnose=lambda: _queue_listing(work))
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed = _record(work, mr.SeriesInstanceUID, "running")
    assert killed is not None, f"the job left running/ before the kill landed; {_queue_listing(work)}"
    journal = work / "jobs" / killed["job"] / "sent.log"
    sent_before = len(journal.read_text().splitlines()) if journal.exists() else 0
    print(f"\nkilled at phase {killed['phase']!r}; instances sent before the kill: {sent_before}")

    proc = _start_node_process(orthanc, work, overrides)
    try:
        _wait_listening(proc, work, waiter, 2)
        rec = _wait_done(waiter, work, mr.SeriesInstanceUID)
        assert rec["crashes"] == 1
        assert "was running when its node died" in (work / "node.log").read_text()
        res = _results(orthanc, mr.StudyInstanceUID)
        assert {m: len(v) for m, v in res.items()} == {"MR": 1, "CT": 1, "SEG": 1, "RTSTRUCT": 1}, res
        assert len(res["CT"][0]["Instances"]) == 8
        assert [p.stem for s in ("pending", "running", "failed") for p in (work / "queue" / s).glob("*.json")] == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert f"node MTLKILL stopped" in (work / "node.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _send_files(port: int, files, calling: str = "ORTHANC", timeout: float = 60) -> list[int]:
    """C-STORE ``files`` to a node on ``port`` as ``calling`` (retrying the association until the node listens)."""
    from pynetdicom import AE

    ae = AE(ae_title=calling)
    ae.add_requested_context(MR_IMAGE)
    end = time.monotonic() + timeout
    while True:
        assoc = ae.associate("127.0.0.1", port, ae_title="MTLNODE")
        if assoc.is_established:
            break
        if time.monotonic() > end:
            pytest.fail(f"no association with the node on port {port} within {timeout} s")
        time.sleep(0.2)
    try:
        return [int(assoc.send_c_store(pydicom.dcmread(f)).Status) for f in files]
    finally:
        assoc.release()


def test_sigterm_mid_inference_leaves_job_resumable(orthanc, tiny_bundle, make_series, tmp_path, waiter):
    """``serve_main`` (what ``mtl-med serve`` runs) gets SIGTERM while its job is in inference: it stops serving,
    puts the job back in pending/ and returns 0; a node started again on the work dir completes the job once."""
    from mtl_med.serve import build_parser, serve_main

    work = tmp_path / "work"
    files = make_series(tmp_path / "mr", seed=51)
    mr = _headers(files)
    port = free_port()
    argv = ["--port", str(port), "--ae-title", "MTLNODE", "--bind", "127.0.0.1", "--destination",
            f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", "--work-dir", str(work), "--allow", "ORTHANC",
            "--quiet-seconds", "0.5", "--bundle", str(BUNDLE)]
    for key, value in {**tiny_bundle, "num_samples": 40}.items():  # an inference long enough to be stopped
        argv += ["--set", f"{key}={json.dumps(value)}"]
    problems: list[str] = []

    def client():
        try:
            assert _send_files(port, files) == [0] * len(files)
            end = time.monotonic() + JOB_TIMEOUT_S
            while _record(work, mr.SeriesInstanceUID, "running") is None:
                if time.monotonic() > end:
                    raise AssertionError(f"the job never reached running/; {_queue_listing(work)}")
                time.sleep(0.01)
            time.sleep(0.2)  # inside the inference
        except BaseException as err:
            problems.append(repr(err))
        os.kill(os.getpid(), signal.SIGTERM)

    t = threading.Thread(target=client, daemon=True)
    t.start()
    code = serve_main(build_parser().parse_args(argv))
    t.join(timeout=10)
    assert not problems, problems
    assert code == 0
    rec = _record(work, mr.SeriesInstanceUID, "pending")
    assert rec is not None and rec["phase"] == "queued", _queue_listing(work)
    log = (work / "node.log").read_text()
    assert "SIGTERM received: stopping" in log and f"job {rec['job']} left pending at phase queued" in log
    assert not list((work / "jobs" / rec["job"]).glob("output/*/*.dcm"))  # nothing half-written published

    again = RunningNode(_node_config(orthanc, work, tiny_bundle, port=free_port()))
    try:
        done = _wait_done(waiter, work, mr.SeriesInstanceUID, log=again.log)
    finally:
        again.close()
    assert done["crashes"] == 0  # a clean stop is not a crash
    res = _results(orthanc, mr.StudyInstanceUID)
    assert {m: len(v) for m, v in res.items()} == {"CT": 1, "SEG": 1, "RTSTRUCT": 1}, res


# ----------------------------------------------------------------------------------------------- allow-list
def test_unknown_calling_ae_rejected(orthanc, node, waiter):
    """A calling AE title that is not on the allow-list is rejected at association (A-ASSOCIATE-RJ, calling AE
    title not recognised) and the node logs it with the peer's address; the allowed one (Orthanc) gets C-ECHO."""
    from pynetdicom import AE

    ae = AE(ae_title="INTRUDER")
    ae.add_requested_context(VERIFICATION)
    ae.add_requested_context(MR_IMAGE)
    assoc = ae.associate("127.0.0.1", node.node.cfg.port, ae_title="MTLNODE")
    assert not assoc.is_established and assoc.is_rejected
    if assoc.is_established:
        assoc.release()
    assert assoc.acceptor.primitive.diagnostic == 0x03  # calling AE title not recognised
    waiter(lambda: "association from INTRUDER (127.0.0.1:" in node.log() and "rejected: calling AE title not on "
           "the allow-list" in node.log(), 10, "the rejection in the node's log")
    assert orthanc.rest("POST", "/modalities/mtlnode/echo", {}) == {}  # Orthanc (ORTHANC) is allowed


# ----------------------------------------------------------------------------------------------- two at once
def test_two_studies_at_once(orthanc, node, make_series, tmp_path, waiter):
    """Two studies sent to the node at the same time (two associations) are both processed, each to its own
    CT series, SEG and RTSTRUCT."""
    mrs, ids = [], []
    for i, seed in enumerate((21, 22)):
        mrs.append(_headers(make_series(tmp_path / f"mr{i}", seed=seed)))
        ids.append(orthanc.upload_folder(tmp_path / f"mr{i}"))
    errors = []
    threads = [threading.Thread(target=lambda s=s: _catch(errors, orthanc.store, "mtlnode", s)) for s in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for mr in mrs:
        rec = _wait_done(waiter, node.node.work, mr.SeriesInstanceUID, log=node.log)
        assert rec["instances"] == 8
        res = _results(orthanc, mr.StudyInstanceUID)
        assert {m: len(v) for m, v in res.items()} == {"MR": 1, "CT": 1, "SEG": 1, "RTSTRUCT": 1}, res


def _catch(errors, fn, *args):
    try:
        fn(*args)
    except Exception as err:  # reported by the test thread
        errors.append(repr(err))


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_series_fails_and_node_keeps_serving(orthanc, node, make_series, tmp_path, waiter):
    """A series the bundle refuses (a slice missing) goes to failed/ with the bundle's one-line error, nothing is
    sent for it, and the node keeps serving."""
    files = make_series(tmp_path / "mr", seed=31)
    mr = _headers(files)
    files[4].unlink()
    orthanc.store("mtlnode", orthanc.upload_folder(tmp_path / "mr"))
    rec = waiter(lambda: _record(node.node.work, mr.SeriesInstanceUID, "failed"), JOB_TIMEOUT_S,
                 "the job in failed/", diagnose=lambda: _queue_listing(node.node.work))
    assert "incomplete series" in rec["error"] and "\n" not in rec["error"]
    assert f"job {rec['job']} failed: " in node.log()
    assert list(_results(orthanc, mr.StudyInstanceUID)) == ["MR"]
    assert orthanc.rest("POST", "/modalities/mtlnode/echo", {}) == {}


# ----------------------------------------------------------------------------------------------- destination down
def test_results_sent_once_after_destination_outage(orthanc, tiny_bundle, make_series, tmp_path, waiter):
    """With the destination down, sending is retried (backoff) and the job fails at phase "inferred"; moved back
    to pending/ on a node whose destination is up, it sends the results it has (no second inference): one
    result series each in Orthanc."""
    work = tmp_path / "work"
    files = make_series(tmp_path / "mr", seed=41)
    mr = _headers(files)
    down = _node_config(orthanc, work, tiny_bundle, port=free_port(), destination=Destination(
        "ORTHANC", "127.0.0.1", free_port()), send_attempts=2, send_backoff=0.1, timeout=5.0)
    running = RunningNode(down)
    try:  # this node is not one Orthanc knows: the series goes to it straight from its files, as ORTHANC
        assert _send_files(down.port, files) == [0] * len(files)
        rec = waiter(lambda: _record(work, mr.SeriesInstanceUID, "failed"), JOB_TIMEOUT_S, "the job in failed/",
                     diagnose=lambda: _queue_listing(work))
    finally:
        running.close()
    assert rec["phase"] == "inferred" and "failed after 2 attempt(s)" in rec["error"], rec
    log = (work / "node.log").read_text()
    assert f"job {rec['job']}: sending to ORTHANC@127.0.0.1:{down.destination.port} failed (attempt 1 of 2)" in log

    up = RunningNode(_node_config(orthanc, work, tiny_bundle, port=free_port()))
    try:
        os.rename(work / "queue" / "failed" / f"{rec['job']}.json", work / "queue" / "pending" / f"{rec['job']}.json")
        done = _wait_done(waiter, work, mr.SeriesInstanceUID, log=up.log)
    finally:
        up.close()
    assert done["infer_seconds"] == rec["infer_seconds"]
    assert (work / "node.log").read_text().count(f"job {rec['job']}: inferred in") == 1
    res = _results(orthanc, mr.StudyInstanceUID)  # the MR went to the node only
    assert {m: len(v) for m, v in res.items()} == {"CT": 1, "SEG": 1, "RTSTRUCT": 1}, res
    assert len(res["CT"][0]["Instances"]) == 8


# ----------------------------------------------------------------------------------------------- dciodvfy
def _dciodvfy(path: Path) -> tuple[list[str], int]:
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")], sum(line.startswith("Warning") for line in lines)


@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (dicom3tools) is not installed: apt-get install dicom3tools, "
                                             "as .ci/setup test does")
def test_stored_files_pass_dciodvfy(e2e, orthanc, node, tmp_path):
    """The CT, SEG and RTSTRUCT instances as Orthanc stored them are valid instances of their IODs to the reference
    validator: 0 error lines. (Errors that the bundle's own files show as well come from the file writers, not
    from the node: then only this assertion is expected to fail.)"""
    counts, errors, writer_errors = {}, {}, {}
    job = e2e["record"]["job"]
    local = {Path(f).name: node.node.work / "jobs" / job / f for f in e2e["record"]["files"]}
    for modality in RESULT_MODALITIES:
        for iid in e2e["results"][modality][0]["Instances"]:
            data = orthanc.file(iid)
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            path = tmp_path / f"{modality}_{ds.SOPInstanceUID}.dcm"
            path.write_bytes(data)
            err, warn = _dciodvfy(path)
            c = counts.setdefault(modality, {"files": 0, "errors": 0, "warnings": 0})
            c["files"] += 1
            c["errors"] += len(err)
            c["warnings"] += warn
            if err:
                errors.setdefault(modality, set()).update(err)
                mine = next(p for p in local.values() if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                            == ds.SOPInstanceUID)
                writer_errors.setdefault(modality, set()).update(_dciodvfy(mine)[0])
    print(f"\ndciodvfy on what Orthanc stored: {counts}")
    if errors:
        from_node = {m: sorted(e - writer_errors.get(m, set())) for m, e in errors.items()
                     if e - writer_errors.get(m, set())}
        assert not from_node, f"errors in what Orthanc stored that the bundle's own files do not have: {from_node}"
        pytest.xfail(f"dciodvfy errors that the file writers (mtl_med/inference/dicom_outputs.py) produce: "
                     f"{ {m: sorted(e) for m, e in errors.items()} }")
