"""What a bundle's ``"initialize"`` does before anything else: refuse config ids that no config of the run
defines, and tie a torchrun worker's life to its launcher.

An override is a config id and a value (``python -m monai.bundle run ... --num_samples 3``, ``mtl-med ... --set
num_samples=3``). MONAI's ``ConfigParser`` adds an id it does not know, so a misspelt one (``--num_sample 3``)
changes nothing and the run goes ahead with the default. :func:`check_ids` refuses such an id with the closest
known one (``num_sample: unknown config id; did you mean 'num_samples'?``); ``mtl-med`` calls it before anything
runs and every bundle config calls :func:`check_overrides` first in ``"initialize"``, for the bundle command line.

Known ids: every id of the merged config files (nested ones too, ``network_def::features``, written with MONAI's
``::`` or the legacy ``#``), the metadata's (``_meta_::version``), ``bundle_root``, the ids an experiment
tracking setting adds, and, under a component (a dict with ``_target_``), a keyword its target takes by name
(``optimizer::weight_decay`` sets an argument the config leaves at its default) and MONAI's reserved keys.

Imports MONAI only when it checks (``mtl-med --help`` stays quick)."""

from __future__ import annotations

import difflib
import inspect
import os
import signal
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from mtl_med.errors import ConfigError

__all__ = ["SEP", "RUNTIME_IDS", "config_ids", "check_ids", "check_overrides", "end_with_launcher",
           "launcher_preexec"]

SEP = "::"  # MONAI's id separator (monai.bundle.utils.ID_SEP_KEY); "#" is its legacy spelling
#: ids a run may set that no config file defines: the bundle folder (MONAI's bundle properties name it and
#: experiment tracking refers to it)
RUNTIME_IDS = ("bundle_root",)
#: keys MONAI reads in any component (a dict with "_target_")
COMPONENT_KEYS = ("_target_", "_disabled_", "_requires_", "_desc_", "_mode_")


def _norm(key: Any) -> str:
    return str(key).replace("#", SEP)


def config_ids(config: Any, prefix: str = "") -> set[str]:
    """Every id of ``config`` (a config dict or a value under id ``prefix``): keys of dicts and indices of lists,
    nested ones joined with ``::``."""
    out: set[str] = set()
    if isinstance(config, Mapping):
        items: Iterable = config.items()
    elif isinstance(config, (list, tuple)):
        items = enumerate(config)
    else:
        return out
    for key, value in items:
        cid = f"{prefix}{SEP}{key}" if prefix else str(key)
        out.add(cid)
        out |= config_ids(value, cid)
    return out


def _keywords(target: Any) -> set[str]:
    """The parameter names a component's ``_target_`` takes by name, located as MONAI locates it (none for an
    expression or an unknown target). ``**kwargs`` names nothing itself; a class's ``**kwargs`` are taken to
    go to its base class (as MONAI's ``DataLoader`` passes ``pin_memory`` to torch's)."""
    if not isinstance(target, str) or target.startswith(("$", "@", "%")):
        return set()
    try:
        from pydoc import locate

        from monai.bundle.config_item import ComponentLocator

        module = ComponentLocator().get_component_module_name(target)
        if isinstance(module, list):
            module = module[0] if module else None
        obj = locate(f"{module}.{target}" if module else target)
        if obj is None:
            return set()
        funcs = [c.__dict__["__init__"] for c in obj.__mro__ if "__init__" in c.__dict__] if inspect.isclass(obj) else [obj]
        names: set[str] = set()
        for fn in funcs:
            params = inspect.signature(fn).parameters.values()
            names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
            if not any(p.kind is p.VAR_KEYWORD for p in params):
                break
    except (ValueError, TypeError, ImportError):  # no signature / not importable: the run itself reports it
        return set()
    return names - {"self"}


def _suggest(cid: str, ids: set[str]) -> str | None:
    """The known id closest to ``cid``: a sibling (same parent) first, then an id anywhere with a close last part
    (``network_def::features`` -> ``features``, the shortest such id), then a close whole id; metadata ids only
    for a metadata id."""
    parent, _, leaf = cid.rpartition(SEP)
    pool = sorted((i for i in ids if cid.startswith("_meta_") or not i.startswith("_meta_")), key=lambda i: (len(i), i))
    siblings = {i.rpartition(SEP)[2]: i for i in pool if i.rpartition(SEP)[0] == parent}
    leaves: dict[str, str] = {}
    for i in pool:
        leaves.setdefault(i.rpartition(SEP)[2], i)
    for names, word in ((siblings, leaf), (leaves, leaf), ({i: i for i in pool}, cid)):
        found = difflib.get_close_matches(word, list(names), n=1)
        if found:
            return names[found[0]]
    return None


class _Ids:
    """The ids of a merged config, growing as overrides are applied in order (so ``--net '{...}'
    --net::x 1`` knows ``net::x`` from the first override's value)."""

    def __init__(self, config_file: Any, meta_file: Any = None, extra: Iterable[str] = ()):
        from monai.bundle import ConfigParser

        self.parser = ConfigParser()
        self.parser.read_config(f=config_file)
        if meta_file is not None:
            self.parser.read_meta(f=meta_file)
        self.ids = config_ids(self.parser.get()) | set(RUNTIME_IDS) | {_norm(i) for i in extra}

    def _component_keys(self, parent: str) -> set[str]:
        """The keys a component at ``parent`` may hold beyond its own: its target's keywords, MONAI's keys."""
        node = self.parser.get(parent) if parent else None
        if not (isinstance(node, Mapping) and "_target_" in node):
            return set()
        return set(COMPONENT_KEYS) | _keywords(node["_target_"])

    def known(self, cid: str) -> bool:
        parent, _, leaf = cid.rpartition(SEP)
        return cid in self.ids or leaf in self._component_keys(parent)

    def candidates(self, cid: str) -> set[str]:
        """The ids a suggestion for ``cid`` is drawn from (MONAI's reserved keys only for one that looks like one)."""
        parent = cid.rpartition(SEP)[0]
        pool = self.ids | {f"{parent}{SEP}{k}" for k in self._component_keys(parent)}
        if not cid.rpartition(SEP)[2].startswith("_"):
            pool = {i for i in pool if i.rpartition(SEP)[2] not in COMPONENT_KEYS}
        return pool

    def apply(self, cid: str, value: Any) -> None:
        try:
            self.parser[cid] = value
        except Exception:  # noqa: BLE001 - MONAI reports an id it cannot set when the run sets it
            return
        self.ids.add(cid)
        self.ids |= config_ids(value, cid)


def _names(config_file: Any) -> str:
    files = [config_file] if isinstance(config_file, (str, os.PathLike)) else list(config_file or [])
    return ", ".join(os.path.basename(str(f)) for f in files) or "the config"


def check_ids(overrides: Mapping[str, Any] | Iterable[str], config_file: Any, meta_file: Any = None,
              extra: Iterable[str] = ()) -> None:
    """Refuse an override id that the merged ``config_file`` (a file or a list, merged as MONAI merges them) and
    ``meta_file`` do not define: a :class:`~mtl_med.errors.ConfigError` naming the first such id and the closest
    known id (``"num_sample: unknown config id; did you mean 'num_samples'?"``), the others after it.
    ``overrides`` maps id -> value (or is a list of ids); ``extra`` names further ids to accept."""
    ids = _Ids(config_file, meta_file, extra)
    pairs = overrides.items() if isinstance(overrides, Mapping) else ((k, None) for k in overrides)
    unknown: list[tuple[str, str]] = []
    for key, value in pairs:
        cid = _norm(key)
        if ids.known(cid):
            ids.apply(cid, value)
            continue
        hint = _suggest(cid, ids.candidates(cid))
        if hint is not None and "#" in str(key) and SEP not in str(key):
            hint = hint.replace(SEP, "#")  # in the spelling the user wrote
        unknown.append((str(key), hint))
    if not unknown:
        return
    (first, hint), rest = unknown[0], unknown[1:]
    problem = (f"unknown config id; did you mean {hint!r}?" if hint else
               f"unknown config id (none of {_names(config_file)} defines it)")
    if rest:
        problem += "; also unknown: " + ", ".join(
            f"{k!r}" + (f" (did you mean {h!r}?)" if h else "") for k, h in rest)
    raise ConfigError(first, problem)


# ------------------------------------------------------------------------------------ the bundle command line
def _workflow_call() -> tuple[Any, Any, dict[str, Any], Any] | None:
    """(config files, metadata file, overrides, tracking) of the ``monai.bundle`` run whose workflow is
    initialising, or None when no such run is on the stack.

    Found on the call stack rather than in ``sys.argv``: the frame of MONAI's ``create_workflow`` (which
    ``python -m monai.bundle run``, ``run_workflow`` and torchrun workers all go through, and which calls
    ``initialize``) holds the overrides after fire has parsed the command line (``--a-b`` is ``a_b``, ``--k=v``,
    positional run ids) and also when a program calls ``monai.bundle.run(...)`` in process, as ``mtl-med``
    does; re-parsing ``sys.argv`` would copy fire's grammar and miss those. The frame is recognised by its code
    object and read through ``create_workflow``'s own signature (its ``args_file`` and ``**kwargs``), merged
    as MONAI merges them (``update_kwargs``); the run's own arguments (those of ``run``, ``create_workflow`` and
    the workflow class) are not config ids. The metadata file is the one the workflow read."""
    from monai.bundle import scripts
    from monai.bundle.workflows import BundleWorkflow, ConfigWorkflow

    target = scripts.create_workflow.__code__
    sig = inspect.signature(scripts.create_workflow)
    var_kw = next((p.name for p in sig.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    frame, workflow = inspect.currentframe(), None
    try:
        while frame is not None and frame.f_code is not target:
            this = frame.f_locals.get("self")
            if workflow is None and isinstance(this, BundleWorkflow):
                workflow = this  # the innermost workflow: the one initialising
            frame = frame.f_back
        if frame is None or var_kw is None or not isinstance(workflow, ConfigWorkflow):
            return None
        local = frame.f_locals
        kwargs = dict(local.get(var_kw) or {})
        config_file, args_file = local.get("config_file"), local.get("args_file")
    finally:
        del frame
    args = scripts.update_kwargs(args=args_file, config_file=config_file, **kwargs)
    if not isinstance(args, dict) or args.get("config_file") is None:
        return None
    own: set[str] = set()
    for fn in (scripts.run, scripts.run_workflow, scripts.create_workflow,
               *(c.__init__ for c in type(workflow).__mro__ if issubclass(c, BundleWorkflow))):
        own |= {p.name for p in inspect.signature(fn).parameters.values()
                if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    overrides = {k: v for k, v in args.items() if k not in own}
    return args["config_file"], getattr(workflow, "meta_file", None), overrides, args.get("tracking")


def _tracking_ids(tracking: Any) -> set[str]:
    if tracking is None:
        return set()
    from monai.bundle import ConfigParser
    from monai.bundle.utils import DEFAULT_EXP_MGMT_SETTINGS

    if isinstance(tracking, str) and tracking in DEFAULT_EXP_MGMT_SETTINGS:
        settings = DEFAULT_EXP_MGMT_SETTINGS[tracking]
    elif isinstance(tracking, dict):
        settings = tracking
    else:
        settings = ConfigParser.load_config_files(tracking)
    return config_ids(settings.get("configs", {}))


def check_overrides() -> None:
    """Refuse (:func:`check_ids`) the override ids of the ``monai.bundle`` run now initialising; a bundle config
    calls it first in ``"initialize"`` (after the excepthook that prints the refusal in one line). Does nothing
    when no such run is on the call stack (a ``ConfigParser`` or workflow a program builds itself; there the
    program chose its ids). An unknown id under an unknown parent (``--netwrk::x``) is refused by MONAI itself,
    before ``initialize``, when it sets the id."""
    call = _workflow_call()
    if call is None:
        return
    config_file, meta_file, overrides, tracking = call
    check_ids(overrides, config_file, meta_file, extra=_tracking_ids(tracking))


# ------------------------------------------------------------------------------------------ torchrun workers
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def end_with_launcher(sig: int = signal.SIGTERM) -> bool:
    """In a torchrun worker on Linux: have the kernel send this process ``sig`` when its launcher dies.

    torchrun's agent stops its workers when it is asked to (SIGTERM / SIGINT), but it starts each in a session
    of its own, so if the agent itself is killed (SIGKILL, the OOM killer) nothing reaches them and they would
    run on, holding GPUs. ``prctl(PR_SET_PDEATHSIG)`` asks the kernel to signal the worker when the thread that
    started it exits (torchrun starts its workers from its main thread). Called from the ``multi_gpu_*``
    configs' ``"initialize"``; a launcher already gone by then (the worker was re-parented to init) ends the
    worker at once. Returns whether the tie is in place; elsewhere (not Linux, not under torchrun) a no-op."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() == 1:  # the launcher died before the tie was made
        os.kill(os.getpid(), sig)
    return True


def launcher_preexec(sig: int = signal.SIGTERM):
    """A ``preexec_fn`` for ``subprocess.Popen`` on Linux that ties the child (``mtl-med``'s torchrun) to its
    parent the same way (None elsewhere). libc is looked up here, in the parent, so the child between fork and
    exec only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    args = (PR_SET_PDEATHSIG, int(sig), 0, 0, 0)

    def tie() -> None:
        prctl(*args)

    return tie
