"""A real PACS for the DICOM node's tests: one Orthanc per test session on free loopback ports, its storage in a
temporary folder, driven through its REST API; skipped, with the reason, where Orthanc is not installed
(``.ci/setup test`` installs it with apt). Also the tiny random-initialised SFG-HighResNet checkpoint and
landmarks the nodes run, and phantom MR series written as DICOM."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

ORTHANC = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin:/usr/bin")
ORTHANC_AET = "ORTHANC"
# the nodes Orthanc knows (DicomModalities): name -> AE title; their ports are chosen when Orthanc starts
NODES = {"mtlnode": "MTLNODE", "mtlkill": "MTLKILL"}
START_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OrthancServer:
    """A running Orthanc: ``rest(method, path, body)`` -> parsed JSON (or bytes), and the helpers the tests use."""

    def __init__(self, root: Path):
        self.root = root
        self.http_port, self.dicom_port = free_port(), free_port()
        self.node_ports = {name: free_port() for name in NODES}
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.config = {
            "Name": "mtl_med-tests",
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AET,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomModalities": {name: [aet, "127.0.0.1", self.node_ports[name]] for name, aet in NODES.items()},
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "DicomScuTimeout": 30,
            "DicomAssociationCloseDelay": 0,
            "Plugins": [],
        }
        self.config_path = root / "orthanc.json"
        self.config_path.write_text(json.dumps(self.config, indent=2))
        self.log_path = root / "orthanc.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([ORTHANC, str(self.config_path)], stdout=self._log, stderr=subprocess.STDOUT,
                                     cwd=self.root)
        end = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with code {self.proc.returncode} at start-up:\n{self.log_tail()}")
            try:
                self.rest("GET", "/system")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        raise RuntimeError(f"Orthanc's REST API did not answer within {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def rest(self, method: str, path: str, body=None, raw: bool = False, timeout: float = 120):
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            out = resp.read()
        return out if raw else json.loads(out) if out else None

    # ---- helpers
    def upload_folder(self, folder: Path) -> str:
        """POST every file of ``folder`` to /instances; returns the Orthanc ID of their (one) series."""
        series = {self.rest("POST", "/instances", f.read_bytes())["ParentSeries"] for f in sorted(folder.iterdir())}
        assert len(series) == 1, series
        return series.pop()

    def store(self, modality: str, series_id: str):
        """Have Orthanc send a series to one of the nodes (C-STORE, synchronous: returns once it is sent)."""
        return self.rest("POST", f"/modalities/{modality}/store", {"Resources": [series_id], "Synchronous": True})

    def series_of_study(self, study_uid: str) -> list[dict]:
        """Every series Orthanc holds in the study: its REST record (MainDicomTags, Instances, ...)."""
        for sid in self.rest("GET", "/studies"):
            study = self.rest("GET", f"/studies/{sid}")
            if study["MainDicomTags"].get("StudyInstanceUID") == study_uid:
                return [self.rest("GET", f"/series/{s}") for s in study["Series"]]
        return []

    def tags(self, instance_id: str) -> dict:
        return self.rest("GET", f"/instances/{instance_id}/simplified-tags")

    def file(self, instance_id: str) -> bytes:
        return self.rest("GET", f"/instances/{instance_id}/file", raw=True)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """One Orthanc for the test session (stopped at its end)."""
    if ORTHANC is None:
        pytest.skip("Orthanc is not installed (apt-get install orthanc, as `.ci/setup test` does): the DICOM node's "
                    "tests need a real PACS")
    pytest.importorskip("pynetdicom", reason="the DICOM node needs pynetdicom (pip install 'mtl_med[dicom]')")
    pytest.importorskip("highdicom", reason="the DICOM outputs need highdicom (pip install 'mtl_med[dicom]')")
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"))
    server.start()
    yield server
    server.stop()


TINY = [4, 8, 8]
SHAPE = (32, 32, 8)


@pytest.fixture(scope="session")
def make_series():
    """``make_series(folder, seed)``: a phantom MR (32 x 32 x 8) written as a DICOM MR series of its own study
    and frame of reference (:func:`mtl_med.data.dicom.write_mr_series`); returns the folder's files."""
    from mtl_med.data import dicom
    from mtl_med.pelvis.phantoms import generate_phantom

    def make(folder: Path, seed: int) -> list[Path]:
        ph = generate_phantom(seed, shape=SHAPE)
        return dicom.write_mr_series(ph.mr / ph.mr.max() * 1000.0, ph.mr_affine, folder)

    return make


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """A random-initialised tiny SFG-HighResNet checkpoint and landmarks, and the config overrides that make the
    bundle's inference run them quickly (2 samples, no N4, no PNG): as ``{id: value}``."""
    import torch

    from mtl_med.pelvis.phantoms import generate_phantom
    from mtl_med.build import sfg_highresnet
    from mtl_med.transforms import learn_landmarks, save_landmarks

    root = tmp_path_factory.mktemp("tiny_bundle")
    mrs = [generate_phantom(s, shape=SHAPE).mr for s in (1, 2)]
    save_landmarks(root / "landmarks.json", learn_landmarks([m / m.max() * 1000.0 for m in mrs]))
    torch.manual_seed(0)
    net = sfg_highresnet(features=TINY)
    with torch.no_grad():  # synthetic CT around 0 HU, inside the clipped range
        net.heads[0].bias.fill_(1.0)
    torch.save(net.state_dict(), root / "model.pt")
    return {
        "ckpt_path": str(root / "model.pt"), "landmarks_path": str(root / "landmarks.json"), "features": TINY,
        "num_samples": 2, "max_batch": 8, "margin": 4, "device": "cpu", "n4": False, "progress": False,
        "save_png": False, "seed": 0,
    }


def wait_for(predicate, timeout: float, what: str, poll: float = 0.1, diagnose=None):
    """Poll ``predicate`` until it returns something truthy (returned); fail naming ``what`` after ``timeout`` s."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            extra = f"\n{diagnose()}" if diagnose is not None else ""
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}{extra}")
        time.sleep(poll)


@pytest.fixture(scope="session")
def waiter():
    return wait_for


def hu_by_position(datasets) -> dict[tuple, np.ndarray]:
    """CT slices (pydicom datasets) as HU arrays keyed by their rounded ImagePositionPatient."""
    return {tuple(np.round(np.asarray(ds.ImagePositionPatient, float), 3)):
            ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets}


@pytest.fixture(scope="session")
def ct_hu():
    return hu_by_position
