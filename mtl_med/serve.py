"""``mtl-med serve``: a DICOM storage node that a PACS sends pelvic MR series to, and that sends back the bundle's
synthetic CT series, DICOM SEG and RT Structure Set.

    mtl-med serve --port 11112 --ae-title MTLNODE --destination ORTHANC@pacs.example:4242 --work-dir /srv/mtl
    python -m mtl_med.serve ...                        # the same, without the ``mtl-med`` front end

A pynetdicom storage SCP accepts MR Image Storage (C-STORE) and Verification (C-ECHO) from the calling AE titles
of ``--allow`` (default: the destination's); any other calling AE title is rejected at association. Every
instance is on disk (temporary name, fsync, ``os.replace``, fsync of the folder) before the node answers success;
a failure to store answers a failure status. A series is complete once ``--quiet-seconds`` pass without a new
instance of it; it is then queued durably as one JSON record under ``<work-dir>/queue/`` that moves
``pending/ -> running/ -> done/ | failed/`` by renames. One worker runs the bundle's inference
(:func:`mtl_med.inference.Predictor`, any config the bundle accepts) on each queued series and sends the DICOM
outputs by C-STORE to ``--destination``, retrying with exponential backoff. What was sent is journalled per
instance, so a node that is killed and restarted resumes every job where it stood and sends each result once.
The layout and the restart rules are in docs/dicom_node.md.

Kept light to import (pynetdicom, torch and MONAI are imported when the node starts), so that ``mtl-med``'s
parser stays fast: ``add_serve_parser(subparsers)`` adds the ``serve`` job, ``serve_main(args)`` runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = ["add_serve_parser", "serve_main", "build_parser", "main", "Node", "NodeConfig", "Destination",
           "QUEUE_STATES", "parse_destination", "parse_sets"]

logger = logging.getLogger("mtl_med.serve")

QUEUE_STATES = ("pending", "running", "done", "failed")
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
VERIFICATION = "1.2.840.10008.1.1"
DICOM_OUTPUT_CHOICES = ("ct", "seg", "rtstruct")
# dicom_outputs choice -> the key of the written path in the predictor's result (mtl_med.inference.writer)
OUTPUT_KEYS = {"ct": "dicom_ct", "seg": "dicom_seg", "rtstruct": "dicom_rtstruct"}
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources (the instance could not be stored)
STATUS_CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand (no Series Instance UID, undecodable)
STORE_WARNINGS = (0xB000, 0xB006, 0xB007)  # coercion of data elements, elements discarded, SOP class mismatch
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_AET = re.compile(r"[\x20-\x5b\x5d-\x7e]{1,16}")  # default character repertoire without backslash


class Stopped(BaseException):
    """The node was asked to stop (SIGTERM / Ctrl-C) while a job was running: the job goes back to pending/.
    A BaseException, as KeyboardInterrupt is, so that no ``except Exception`` on the way (MONAI wraps the errors of
    its transforms) turns it into a failed case."""


class SendError(Exception):
    """One attempt to send a job's results failed."""


# ----------------------------------------------------------------------------------------------- options
@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def _ae_title(text: str) -> str:
    value = text.strip()
    if not _AET.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not an AE title (1 to 16 characters, no backslash)")
    return value


def parse_destination(text: str) -> Destination:
    """``AET@HOST:PORT`` (an IPv6 host in brackets: ``AET@[::1]:104``)."""
    aet, at, rest = text.partition("@")
    host, colon, port = rest.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not (at and colon and host and port.isdigit() and 0 < int(port) < 65536):
        raise argparse.ArgumentTypeError(f"{text!r} is not AET@HOST:PORT")
    return Destination(_ae_title(aet), host, int(port))


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``--set ID=VALUE`` items as config overrides: VALUE read as JSON, else kept as text."""
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise argparse.ArgumentTypeError(f"--set needs ID=VALUE, got {item!r}")
        out[key.strip()] = _value(value)
    return out


def _add_options(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("DICOM")
    d.add_argument("--port", type=int, required=True, help="TCP port the node listens on")
    d.add_argument("--ae-title", type=_ae_title, default="MTLNODE", help="the node's AE title (default: %(default)s)")
    d.add_argument("--destination", type=parse_destination, required=True, metavar="AET@HOST:PORT",
                   help="where the results go by C-STORE (usually the PACS that sends the MR series)")
    d.add_argument("--allow", type=_ae_title, nargs="+", action="extend", metavar="AET",
                   help="calling AE titles allowed to associate; others are rejected at association "
                        "(default: the destination's AE title)")
    d.add_argument("--bind", default="0.0.0.0", metavar="ADDRESS",
                   help="address the node listens on (default: %(default)s, every interface)")
    d.add_argument("--quiet-seconds", type=float, default=10.0, metavar="S",
                   help="a series is complete after S seconds without a new instance (default: %(default)s)")
    d.add_argument("--send-attempts", type=int, default=5, metavar="N",
                   help="attempts to send a job's results before it fails (default: %(default)s)")
    d.add_argument("--send-backoff", type=float, default=2.0, metavar="S",
                   help="seconds before the second attempt, doubled for each further one (default: %(default)s)")
    d.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="network, ACSE and DIMSE timeout of the associations (default: %(default)s)")
    w = p.add_argument_group("work")
    w.add_argument("--work-dir", type=Path, required=True, metavar="DIR",
                   help="received instances, the job queue, outputs and the node's log (docs/dicom_node.md)")
    w.add_argument("--max-crashes", type=int, default=3, metavar="N",
                   help="a job during which the node died N times goes to failed/ instead of running again "
                        "(default: %(default)s)")
    b = p.add_argument_group("inference (the bundle's configs/inference.json)")
    b.add_argument("--bundle", type=Path, default=None, metavar="DIR",
                   help="bundle folder (default: $MTL_MED_BUNDLE, else bundles/sfg_highresnet_pelvis of the checkout)")
    b.add_argument("--config", action="append", default=[], metavar="JSON",
                   help="another config file merged after inference.json, e.g. configs/demo.json (repeatable)")
    b.add_argument("--set", action="append", default=[], metavar="ID=VALUE",
                   help="set a config id, VALUE read as JSON else text, as `python -m monai.bundle run --ID VALUE` "
                        "(repeatable), e.g. --set num_samples=20 --set device=cuda")
    b.add_argument("--outputs", nargs="+", choices=DICOM_OUTPUT_CHOICES, default=list(DICOM_OUTPUT_CHOICES),
                   help="DICOM outputs sent back (dicom_outputs; default: %(default)s)")
    p.add_argument("--verbose", action="store_true", help="debug log, pynetdicom's messages included")


SERVE_HELP = "DICOM storage node: MR series in by C-STORE, sCT / SEG / RTSTRUCT out to a PACS"


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``serve`` job to ``mtl-med``'s subparsers; ``serve_main(args)`` runs the parsed arguments."""
    p = subparsers.add_parser("serve", help=SERVE_HELP, description=f"{SERVE_HELP} (docs/dicom_node.md)")
    _add_options(p)
    return p


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mtl-med serve", description=f"{SERVE_HELP} (docs/dicom_node.md)")
    _add_options(p)
    return p


# ----------------------------------------------------------------------------------------------- files
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    """``data`` onto ``path`` whole or not at all, on disk when this returns: a hidden temporary name in the same
    folder, fsync, ``os.replace``, fsync of the folder."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _write_json(path: Path, obj: Any) -> None:
    _write_durably(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _rename(src: Path, dst: Path) -> None:
    os.rename(src, dst)
    _fsync_dir(dst.parent)
    if src.parent != dst.parent:
        _fsync_dir(src.parent)


def safe_name(uid: str) -> str:
    """A UID as a file or folder name: itself when it is one (digits and dots), else a hash of it."""
    uid = str(uid).strip().rstrip("\x00")
    if _UID.fullmatch(uid) and len(uid) <= 64:
        return uid
    return "x" + hashlib.sha1(uid.encode()).hexdigest()[:24]


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ----------------------------------------------------------------------------------------------- the node
@dataclass
class NodeConfig:
    port: int
    ae_title: str
    destination: Destination
    work_dir: Path
    allow: list[str] = field(default_factory=list)
    bind: str = "0.0.0.0"
    quiet_seconds: float = 10.0
    send_attempts: int = 5
    send_backoff: float = 2.0
    timeout: float = 30.0
    max_crashes: int = 3
    bundle: Path | None = None
    config: list[str] = field(default_factory=list)
    overrides: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=lambda: list(DICOM_OUTPUT_CHOICES))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "NodeConfig":
        return cls(port=args.port, ae_title=args.ae_title, destination=args.destination,
                   work_dir=Path(args.work_dir).expanduser().resolve(),
                   allow=list(args.allow or [args.destination.ae_title]), bind=args.bind,
                   quiet_seconds=args.quiet_seconds, send_attempts=args.send_attempts,
                   send_backoff=args.send_backoff, timeout=args.timeout, max_crashes=args.max_crashes,
                   bundle=args.bundle, config=list(args.config), overrides=parse_sets(args.set),
                   outputs=list(dict.fromkeys(args.outputs)))


@dataclass
class _Receiving:
    series_uid: str
    first: float
    last: float
    instances: int = 0
    calling: set = field(default_factory=set)
    study_uid: str = ""


class Node:
    """The storage node: ``open()`` (lock the work dir, recover the queue, load the bundle, listen), then
    ``serve_forever()`` (the worker loop, in the calling thread) until ``request_stop()``, then ``close()``."""

    def __init__(self, cfg: NodeConfig, predictor: Any = None):
        self.cfg = cfg
        self.work = Path(cfg.work_dir)
        self.incoming = self.work / "incoming"
        self.jobs = self.work / "jobs"
        self.queue = {s: self.work / "queue" / s for s in QUEUE_STATES}
        self.predictor = predictor
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # guards the two dicts below
        self._series_locks: dict[str, threading.Lock] = {}
        self._receiving: dict[str, _Receiving] = {}
        self._assoc_counts: dict[int, int] = {}
        self._interruptible = False
        self._lock_fd: int | None = None
        self._ae = None
        self._server = None
        self._watcher: threading.Thread | None = None
        self._log_handler: logging.Handler | None = None
        self.current_job: str | None = None

    # ---- start and stop
    def open(self) -> "Node":
        for d in (self.incoming, self.jobs, *self.queue.values()):
            d.mkdir(parents=True, exist_ok=True)
        self._log_handler = logging.FileHandler(self.work / "node.log")
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        base = logging.getLogger("mtl_med")
        base.addHandler(self._log_handler)
        if base.getEffectiveLevel() > logging.INFO:
            base.setLevel(logging.INFO)
        self._take_lock()
        self._recover()
        if self.predictor is None:
            self.predictor = load_predictor(self.cfg)
        self._start_scp()
        self._watcher = threading.Thread(target=self._watch, name="mtl-serve-watcher", daemon=True)
        self._watcher.start()
        logger.info("node %s listening on %s:%d; allowed calling AE titles: %s; results to %s; work dir %s; "
                    "series complete after %.3g s quiet", self.cfg.ae_title, self.cfg.bind, self.cfg.port,
                    " ".join(self.cfg.allow) or "(any)", self.cfg.destination, self.work, self.cfg.quiet_seconds)
        self._warm_up()  # while the first series may already be arriving
        return self

    def _take_lock(self) -> None:
        path = self.work / "node.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            other = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            from mtl_med.errors import InputError

            raise InputError(self.work, f"another node serves this work dir ({other or 'pid unknown'})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._lock_fd = fd

    def _warm_up(self) -> None:
        """Read a two-slice series once, so that the first real series does not pay for what ITK loads lazily on
        its first DICOM read (seconds), and import the SEG writer's package."""
        import numpy as np

        from mtl_med.data import dicom

        folder = self.work / ".warm-up"
        t0 = time.perf_counter()
        try:
            shutil.rmtree(folder, ignore_errors=True)
            dicom.write_mr_series(np.zeros((4, 4, 2)), np.eye(4), folder)
            dicom.load_series(folder)
            if "seg" in self.cfg.outputs:
                import highdicom  # noqa: F401
            logger.info("DICOM reading warmed up in %.1f s", time.perf_counter() - t0)
        except Exception as err:  # the first series pays for it instead
            logger.warning("warming up the DICOM reader failed (%s: %s)", type(err).__name__, err)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def request_stop(self, signum: int | None = None, frame: Any = None) -> None:
        """Stop serving: no new association, no new job; an inference in progress is interrupted (it goes back to
        pending/), a send stops after the instance in flight. Safe to call from a signal handler."""
        first = not self._stop.is_set()
        self._stop.set()
        self._wake.set()
        if first and signum is not None:
            logger.info("%s received: stopping", signal.Signals(signum).name)
        if signum is not None and self._interruptible:
            self._interruptible = False
            raise Stopped()

    def close(self, grace: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._server is not None:
            self._server.shutdown()  # no new association
            end = time.monotonic() + grace
            while self._active_acceptors() and time.monotonic() < end:
                time.sleep(0.05)
            self._ae.shutdown()  # aborts what is left: an unanswered C-STORE was never acknowledged
            self._server = None
        if self._watcher is not None:
            self._watcher.join(timeout=grace)
            self._watcher = None
            logger.info("node %s stopped", self.cfg.ae_title)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if self._log_handler is not None:
            logging.getLogger("mtl_med").removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None

    def _active_acceptors(self) -> list:
        return [a for a in self._ae.active_associations if a.is_acceptor] if self._ae is not None else []

    # ---- recovery at start-up
    def _recover(self) -> None:
        """What a node that died left, made resumable: half-written instances removed, jobs in running/ (their node
        is dead: it held the lock) back to pending/, a job folder queued without its record recorded, and the
        series still receiving timed from their files."""
        for tmp in [*self.incoming.glob("*/.*.tmp"), *self.work.glob("queue/*/.*.tmp")]:
            with contextlib.suppress(OSError):
                tmp.unlink()
        for path in sorted(self.queue["running"].glob("*.json")):
            rec = json.loads(path.read_text())
            rec["crashes"] = int(rec.get("crashes", 0)) + 1
            logger.warning("job %s was running when its node died (%s); resuming it at phase %s",
                           path.stem, rec.get("owner", "owner unknown"), rec.get("phase", "queued"))
            _write_json(path, rec)
            _rename(path, self.queue["pending"] / path.name)
        known = {p.stem for s in QUEUE_STATES for p in self.queue[s].glob("*.json")}
        for jobdir in sorted(p for p in self.jobs.iterdir() if p.is_dir()):
            if jobdir.name not in known and (jobdir / "input").is_dir():
                rec = self._new_record(jobdir.name, jobdir / "input", None)
                _write_json(self.queue["pending"] / f"{jobdir.name}.json", rec)
                logger.warning("job %s was queued when its node stopped: recorded as pending", jobdir.name)
        for folder in sorted(p for p in self.incoming.iterdir() if p.is_dir()):
            files = [f for f in folder.iterdir() if f.suffix == ".dcm"]
            if not files:
                shutil.rmtree(folder, ignore_errors=True)
                continue
            times = [f.stat().st_mtime for f in files]
            uid = _read_tag(files[0], "SeriesInstanceUID") or folder.name
            self._receiving[folder.name] = _Receiving(uid, min(times), max(times), len(files), set(),
                                                      _read_tag(files[0], "StudyInstanceUID") or "")
            logger.info("series %s: %d instance(s) received before the node stopped; queued after %.3g s quiet",
                        uid, len(files), self.cfg.quiet_seconds)

    # ---- the storage SCP
    def _start_scp(self) -> None:
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.cfg.ae_title)
        ae.require_calling_aet = list(self.cfg.allow)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.cfg.timeout
        ae.add_supported_context(MR_IMAGE_STORAGE)  # the default (uncompressed) transfer syntaxes
        ae.add_supported_context(VERIFICATION)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_REQUESTED, self._on_requested), (evt.EVT_ACCEPTED, self._on_accepted),
                    (evt.EVT_REJECTED, self._on_rejected), (evt.EVT_RELEASED, self._on_ended),
                    (evt.EVT_ABORTED, self._on_ended)]
        self._ae = ae
        try:
            self._server = ae.start_server((self.cfg.bind, self.cfg.port), block=False, evt_handlers=handlers)
        except OSError as err:
            from mtl_med.errors import InputError

            raise InputError(f"{self.cfg.bind}:{self.cfg.port}", f"cannot listen ({err.strerror or err})") from err

    @staticmethod
    def _peer(event: Any) -> tuple[str, str]:
        req = event.assoc.requestor
        # the requestor's ae_title is set only after EVT_REQUESTED: the request's calling AE title before
        aet = getattr(getattr(req, "primitive", None), "calling_ae_title", None) or req.ae_title
        return str(aet).strip(), f"{req.address}:{req.port}"

    def _on_requested(self, event: Any) -> None:
        aet, addr = self._peer(event)
        logger.info("association requested by %s from %s (called AE %s)", aet, addr,
                    str(event.assoc.acceptor.ae_title).strip())

    def _on_accepted(self, event: Any) -> None:
        aet, addr = self._peer(event)
        logger.info("association from %s (%s) accepted", aet, addr)

    def _on_rejected(self, event: Any) -> None:
        aet, addr = self._peer(event)
        why = ("calling AE title not on the allow-list (" + " ".join(self.cfg.allow) + ")"
               if self.cfg.allow and aet not in self.cfg.allow else "too many associations or bad request")
        logger.warning("association from %s (%s) rejected: %s", aet, addr, why)

    def _on_ended(self, event: Any) -> None:
        aet, addr = self._peer(event)
        with self._lock:
            n = self._assoc_counts.pop(id(event.assoc), 0)
        how = "released" if event.event.name == "EVT_RELEASED" else "aborted"
        logger.info("association from %s (%s) %s; %d instance(s) stored", aet, addr, how, n)

    def _on_echo(self, event: Any) -> int:
        aet, addr = self._peer(event)
        logger.info("C-ECHO from %s (%s)", aet, addr)
        return STATUS_SUCCESS

    def _series_lock(self, key: str) -> threading.Lock:
        with self._lock:
            return self._series_locks.setdefault(key, threading.Lock())

    def _on_store(self, event: Any) -> int:
        """Store one instance durably, then answer success; a failure answers a failure status."""
        aet, addr = self._peer(event)
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            series_uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
            sop_uid = str(event.request.AffectedSOPInstanceUID or ds.get("SOPInstanceUID", "")).strip()
            if not series_uid or not sop_uid:
                logger.error("C-STORE from %s (%s): instance without SeriesInstanceUID / SOPInstanceUID refused",
                             aet, addr)
                return STATUS_CANNOT_UNDERSTAND
            if hasattr(event, "encoded_dataset"):  # pynetdicom >= 2.1: the bytes as sent, not re-encoded
                data = event.encoded_dataset(include_meta=True)
            else:  # pragma: no cover - pynetdicom 2.0
                from io import BytesIO

                buf = BytesIO()
                ds.save_as(buf, enforce_file_format=True)
                data = buf.getvalue()
        except Exception as err:
            logger.error("C-STORE from %s (%s): cannot decode the instance (%s: %s)", aet, addr,
                         type(err).__name__, err)
            return STATUS_CANNOT_UNDERSTAND
        key = safe_name(series_uid)
        try:
            with self._series_lock(key):
                folder = self.incoming / key
                new_folder = not folder.is_dir()
                folder.mkdir(parents=True, exist_ok=True)
                if new_folder:
                    _fsync_dir(self.incoming)
                path = folder / f"{safe_name(sop_uid)}.dcm"
                known = path.exists()
                _write_durably(path, data)
                now = time.time()
                with self._lock:
                    rec = self._receiving.get(key)
                    if rec is None:
                        rec = self._receiving[key] = _Receiving(series_uid, now, now, 0, set(),
                                                                str(ds.get("StudyInstanceUID", "") or ""))
                        logger.info("series %s: first instance from %s (%s)", series_uid, aet, addr)
                    rec.last = now
                    rec.instances += 0 if known else 1
                    rec.calling.add(aet)
                    self._assoc_counts[id(event.assoc)] = self._assoc_counts.get(id(event.assoc), 0) + 1
        except Exception as err:
            logger.error("C-STORE from %s (%s): instance %s of series %s not stored (%s: %s)", aet, addr, sop_uid,
                         series_uid, type(err).__name__, err)
            return STATUS_OUT_OF_RESOURCES
        return STATUS_SUCCESS

    # ---- complete series -> queue
    def _watch(self) -> None:
        poll = max(0.05, min(1.0, self.cfg.quiet_seconds / 4))
        while not self._stop.is_set():
            try:
                self.queue_quiet_series()
            except Exception:  # the node keeps serving; the series stays in incoming/ and is tried again
                logger.exception("queueing a received series failed")
            self._stop.wait(poll)

    def queue_quiet_series(self, now: float | None = None) -> list[str]:
        """Queue every series that has had no new instance for ``quiet_seconds``; returns the new job ids."""
        queued = []
        with self._lock:
            candidates = list(self._receiving)
        for key in candidates:
            with self._series_lock(key):
                with self._lock:
                    rec = self._receiving.get(key)
                if rec is None or (now if now is not None else time.time()) - rec.last < self.cfg.quiet_seconds:
                    continue
                job = self._claim_job_id(key)
                jobdir = self.jobs / job
                _rename(self.incoming / key, jobdir / "input")
                with self._lock:
                    del self._receiving[key]
            merged = self._merge_earlier(key, job)
            record = self._new_record(job, jobdir / "input", rec)
            _write_json(self.queue["pending"] / f"{job}.json", record)
            logger.info("series %s received: %d instance(s) from %s in %.2f s%s; queued as job %s", rec.series_uid,
                        record["instances"], " ".join(sorted(rec.calling)) or "?", rec.last - rec.first,
                        f" ({merged} more from its earlier job)" if merged else "", job)
            queued.append(job)
            self._wake.set()
        return queued

    def _claim_job_id(self, key: str) -> str:
        n = 1
        while True:
            job = key if n == 1 else f"{key}_{n}"
            try:
                (self.jobs / job).mkdir()
                _fsync_dir(self.jobs)
                return job
            except FileExistsError:
                n += 1

    def _merge_earlier(self, key: str, job: str) -> int:
        """Instances of the same series from its latest earlier job that this one lacks (a series completed or
        re-sent later is processed whole), hard-linked in."""
        earlier = sorted((p for p in self.jobs.iterdir() if p.name != job and (p.name == key or p.name.startswith(
            f"{key}_")) and (p / "input").is_dir()), key=lambda p: (len(p.name), p.name))
        if not earlier:
            return 0
        n, dst = 0, self.jobs / job / "input"
        for f in (earlier[-1] / "input").glob("*.dcm"):
            if not (dst / f.name).exists():
                try:
                    os.link(f, dst / f.name)
                except OSError:
                    shutil.copy2(f, dst / f.name)
                n += 1
        if n:
            _fsync_dir(dst)
        return n

    def _new_record(self, job: str, input_dir: Path, rec: _Receiving | None) -> dict:
        files = sorted(input_dir.glob("*.dcm"))
        series = rec.series_uid if rec else (_read_tag(files[0], "SeriesInstanceUID") if files else None)
        study = rec.study_uid if rec else (_read_tag(files[0], "StudyInstanceUID") if files else None)
        return {"job": job, "series_uid": series or job.split("_")[0], "study_uid": study or "",
                "case": safe_name(series or job.split("_")[0]), "instances": len(files),
                "calling_ae": sorted(rec.calling) if rec else [],
                "received_first": rec.first if rec else None, "received_last": rec.last if rec else None,
                "receive_seconds": round(rec.last - rec.first, 3) if rec else None,
                "queued_at": time.time(), "phase": "queued", "crashes": 0, "destination": str(self.cfg.destination)}

    # ---- the worker
    def pending_jobs(self) -> list[str]:
        recs = []
        for p in self.queue["pending"].glob("*.json"):
            if p.name.startswith("."):
                continue
            try:
                recs.append((float(json.loads(p.read_text()).get("queued_at") or 0.0), p.stem))
            except (OSError, ValueError, TypeError, AttributeError):
                recs.append((0.0, p.stem))  # unreadable: run_job moves it to failed/
        return [job for _, job in sorted(recs)]

    def serve_forever(self) -> None:
        """Run queued jobs one at a time until :meth:`request_stop`."""
        while not self._stop.is_set():
            jobs = self.pending_jobs()
            if not jobs:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                self.run_job(jobs[0])
            except Exception:  # the queue itself could not be written (disk full, ...): keep serving
                logger.exception("job %s could not be run; the node goes on", jobs[0])
                self._stop.wait(5.0)

    def _save(self, state: str, rec: dict) -> None:
        _write_json(self.queue[state] / f"{rec['job']}.json", rec)

    def _move(self, rec: dict, src: str, dst: str) -> None:
        self._save(src, rec)
        _rename(self.queue[src] / f"{rec['job']}.json", self.queue[dst] / f"{rec['job']}.json")

    def run_job(self, job: str) -> str:
        """Run one pending job: inference (unless done before), then send what was not sent yet. Returns the
        state it ends in: done, failed, or pending (stopped)."""
        src = self.queue["pending"] / f"{job}.json"
        try:
            rec = json.loads(src.read_text())
            if not isinstance(rec, dict) or "series_uid" not in rec:
                raise ValueError("not a job record")
        except (OSError, ValueError) as err:
            _rename(src, self.queue["failed"] / src.name)
            logger.error("job %s failed: its record %s cannot be read (%s)", job, src, err)
            return "failed"
        rec["job"] = job
        rec["owner"] = f"pid {os.getpid()} on {socket.gethostname()}"
        rec["started_at"] = time.time()
        self._move(rec, "pending", "running")
        self.current_job = job
        try:
            if int(rec.get("crashes", 0)) >= self.cfg.max_crashes:
                raise RuntimeError(f"the node died {rec['crashes']} times while running this job "
                                   f"(--max-crashes {self.cfg.max_crashes})")
            if rec.get("phase") != "inferred":
                self._infer(rec)
            self._send(rec)
        except Stopped:
            self._move(rec, "running", "pending")
            logger.info("job %s left pending at phase %s: it resumes when the node starts again", job, rec["phase"])
            return "pending"
        except Exception as err:
            from mtl_med.errors import user_error

            found = user_error(err)
            msg = str(found) if found is not None else f"{type(err).__name__}: {err}"
            msg = " ".join(msg.split())
            rec.update(error=msg, failed_at=time.time())
            self._move(rec, "running", "failed")
            logger.error("job %s failed: %s", job, msg)
            logger.debug("traceback of job %s", job, exc_info=True)
            return "failed"
        finally:
            self.current_job = None
        rec.update(phase="sent", done_at=time.time())
        self._move(rec, "running", "done")
        logger.info("job %s done: series %s -> %d instance(s) at %s (receive %.2f s, inference %.2f s, send %.2f s)",
                    job, rec["series_uid"], len(rec["files"]), self.cfg.destination, rec.get("receive_seconds") or 0,
                    rec["infer_seconds"], rec["send_seconds"])
        return "done"

    def _infer(self, rec: dict) -> None:
        jobdir = self.jobs / rec["job"]
        out = jobdir / "output"
        t0 = time.perf_counter()
        logger.info("job %s: inference on series %s (%d instance(s))", rec["job"], rec["series_uid"], rec["instances"])
        try:
            self._interruptible = True
            if self._stop.is_set():
                raise Stopped()
            res = self.predictor.predict_case(str(jobdir / "input"), output_dir=str(out), case=rec["case"])
        finally:
            self._interruptible = False
        files = []
        for choice in self.cfg.outputs:
            p = Path(res["paths"][OUTPUT_KEYS[choice]])
            found = sorted(p.glob("*.dcm")) if p.is_dir() else [p]
            files += [str(f.relative_to(jobdir)) for f in found]
        rec.update(phase="inferred", files=files, infer_seconds=round(time.perf_counter() - t0, 3))
        self._save("running", rec)  # from here on a restart sends these files, never infers again
        logger.info("job %s: inferred in %.2f s; %d instance(s) to send", rec["job"], rec["infer_seconds"], len(files))

    # ---- sending
    def _sent(self, jobdir: Path) -> set[str]:
        journal = jobdir / "sent.log"
        if not journal.is_file():
            return set()
        lines = journal.read_text().split("\n")[:-1]  # a line cut by a crash has no newline: not sent
        return {line.split("\t")[0] for line in lines if line}

    def _send(self, rec: dict) -> None:
        jobdir = self.jobs / rec["job"]
        sent = self._sent(jobdir)
        todo = [f for f in rec["files"] if f not in sent]
        t0 = time.perf_counter()
        if sent:
            logger.info("job %s: %d of %d instance(s) were sent before; sending the other %d", rec["job"],
                        len(rec["files"]) - len(todo), len(rec["files"]), len(todo))
        attempt = 0
        while todo:
            attempt += 1
            try:
                self._send_once(jobdir, todo)
            except SendError as err:
                if attempt >= self.cfg.send_attempts:
                    raise SendError(f"sending to {self.cfg.destination} failed after {attempt} attempt(s): {err}; "
                                    f"{len(todo)} of {len(rec['files'])} instance(s) not sent") from None
                delay = self.cfg.send_backoff * 2 ** (attempt - 1)
                logger.warning("job %s: sending to %s failed (attempt %d of %d): %s; retrying in %.3g s", rec["job"],
                               self.cfg.destination, attempt, self.cfg.send_attempts, err, delay)
                if self._stop.wait(delay):
                    raise Stopped() from None
        rec["send_seconds"] = round(rec.get("send_seconds", 0.0) + time.perf_counter() - t0, 3)
        rec["send_attempts"] = int(rec.get("send_attempts", 0)) + attempt
        logger.info("job %s: sent %d instance(s) to %s in %.2f s", rec["job"], len(rec["files"]),
                    self.cfg.destination, rec["send_seconds"])

    def _send_once(self, jobdir: Path, todo: list[str]) -> None:
        """One association to the destination; each instance it accepts is journalled and removed from ``todo``."""
        import pydicom
        from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
        from pynetdicom import AE

        dest = self.cfg.destination
        datasets = []
        for rel in todo:
            datasets.append((rel, pydicom.dcmread(jobdir / rel)))
        ae = AE(ae_title=self.cfg.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.cfg.timeout
        for sop in sorted({str(ds.SOPClassUID) for _, ds in datasets}):
            syntaxes = {str(ds.file_meta.TransferSyntaxUID) for _, ds in datasets if str(ds.SOPClassUID) == sop}
            ae.add_requested_context(sop, sorted(syntaxes | {ExplicitVRLittleEndian, ImplicitVRLittleEndian}))
        try:
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
        except Exception as err:  # an unresolvable host name, ...
            raise SendError(f"cannot associate ({type(err).__name__}: {err})") from err
        if not assoc.is_established:
            why = "rejected" if assoc.is_rejected else "not established (connection refused, aborted or timed out)"
            raise SendError(f"association {why}")
        try:
            with open(jobdir / "sent.log", "a") as journal:
                for rel, ds in datasets:
                    if self._stop.is_set():
                        raise Stopped()
                    status = assoc.send_c_store(ds)
                    code = int(getattr(status, "Status", -1)) if status else -1
                    if code == -1:
                        raise SendError(f"{rel}: no C-STORE response (connection lost or timed out)")
                    if code != STATUS_SUCCESS and code not in STORE_WARNINGS:
                        raise SendError(f"{rel}: C-STORE status 0x{code:04X}")
                    if code != STATUS_SUCCESS:
                        logger.warning("%s: stored by %s with warning status 0x%04X", rel, dest, code)
                    journal.write(f"{rel}\t{ds.SOPInstanceUID}\n")
                    journal.flush()
                    os.fsync(journal.fileno())
                    todo.remove(rel)
        finally:
            if assoc.is_established:
                assoc.release()


def _read_tag(path: Path, keyword: str) -> str | None:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[keyword])
        value = ds.get(keyword)
        return str(value).strip() if value else None
    except Exception:
        return None


# ----------------------------------------------------------------------------------------------- the bundle
def _check_ids(parser: Any, overrides: dict[str, Any]) -> None:
    from mtl_med.errors import ConfigError

    for key in overrides:
        if key not in parser:
            top = [k for k in (parser.get() or {}) if isinstance(k, str)]
            close = difflib.get_close_matches(key.split("#")[0], top, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(key, f"no config of the bundle defines this id{hint}")


def load_predictor(cfg: NodeConfig) -> Any:
    """The bundle's predictor with the node's configs and overrides, ``dicom_outputs`` set from ``outputs`` (and
    ``progress`` off unless set): what ``python -m monai.bundle run`` with the same files and ids would build."""
    from mtl_med.inference import Predictor
    from mtl_med.inference.bundle import bundle_parser, default_bundle

    root = Path(cfg.bundle).expanduser().resolve() if cfg.bundle is not None else default_bundle()
    files = [str(root / "configs" / "inference.json")] + [str(Path(c).expanduser().resolve()) for c in cfg.config]
    overrides = {"progress": False, **cfg.overrides, "dicom_outputs": list(cfg.outputs)}
    _check_ids(bundle_parser(root, files), overrides)
    t0 = time.perf_counter()
    predictor = Predictor(root, files, **overrides)
    logger.info("bundle %s loaded in %.1f s (configs %s; overrides %s)", root, time.perf_counter() - t0,
                ", ".join(Path(f).name for f in files), json.dumps(cfg.overrides, sort_keys=True))
    return predictor


# ----------------------------------------------------------------------------------------------- entry points
def _setup_logging(verbose: bool) -> None:
    root = logging.getLogger()
    if not root.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(h)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("pynetdicom").setLevel(logging.INFO if verbose else logging.WARNING)


def serve_main(args: argparse.Namespace) -> int:
    """Run the node of parsed ``serve`` arguments until SIGTERM / Ctrl-C (exit code 0); 2 for a bad option or
    config id, 1 when the node cannot start (port in use, work dir served by another node, bundle error)."""
    from mtl_med.errors import ConfigError, user_error

    _setup_logging(getattr(args, "verbose", False))
    try:
        cfg = NodeConfig.from_args(args)
    except argparse.ArgumentTypeError as err:
        sys.stderr.write(f"mtl-med serve: error: {err}\n")
        return 2
    if cfg.send_attempts < 1 or cfg.quiet_seconds < 0 or cfg.send_backoff < 0 or cfg.max_crashes < 1:
        sys.stderr.write("mtl-med serve: error: --send-attempts and --max-crashes must be 1 or more, "
                         "--quiet-seconds and --send-backoff 0 or more\n")
        return 2
    node = Node(cfg)
    previous = {}
    for name in ("SIGTERM", "SIGINT", "SIGHUP"):
        if hasattr(signal, name):
            previous[name] = signal.signal(getattr(signal, name), node.request_stop)
    try:
        try:
            node.open()
        except Stopped:
            return 0
        except ConfigError as err:
            sys.stderr.write(f"mtl-med serve: error: {err}\n")
            return 2
        except Exception as err:
            found = user_error(err)
            msg = found if found is not None else f"{type(err).__name__}: {err}"
            sys.stderr.write(f"mtl-med serve: error: {msg}\n")
            return 1
        try:
            node.serve_forever()
        except Stopped:  # arrived between two jobs
            pass
        return 0
    finally:
        node.close()
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return serve_main(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
