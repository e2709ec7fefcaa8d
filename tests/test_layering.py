"""Layering: the library (mtl_med) and its bundles never import the command-line tools (data_prep).

data_prep -> mtl_med is the only allowed direction. Checked three ways, because a module-level import test
alone misses imports made inside functions (the demo once imported ``data_prep.phantoms`` in ``main``) and
imports made by bundle configs (``"$from data_prep.landmarks import ..."`` in train.json):

* every module under mtl_med imports in a fresh interpreter in which ``data_prep`` cannot be imported;
* every ``"$import ..."`` / ``"$from ... import ..."`` expression of every bundle config runs there too;
* no import statement anywhere in mtl_med's source (function bodies included) names data_prep.

Within mtl_med, the errors and the atomic writers are leaves: importing one of them
imports no other module of the package, so any module can use them without an import cycle (the writers raise
the errors' classes, imported where they raise: a leaf may use another leaf).

The pelvis application (mtl_med/pelvis/: its constants, phantoms, presentation values) sits above the generic layers:
no module of mtl_med outside that package imports it (function bodies included), but the entry points that use the
application (:data:`PELVIS_ENTRY_POINTS`); the bundle configs and the command-line tools use it too.

Sharing methods stay in their packages: no module outside mtl_med/sharing/ but the registry (mtl_med/build.py)
imports a method's module, the engines never import mtl_med.sharing at all (a method's needs reach them through
the network's hooks), and mtl_med's top-level packages import one another in no circle (function bodies included).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = "data_prep"
LEAVES = ("mtl_med.errors", "mtl_med.io")
PELVIS = "mtl_med.pelvis"
# top-level entry points that may use the pelvis application (python -m mtl_med.demo makes a pelvis phantom)
PELVIS_ENTRY_POINTS = ("mtl_med/demo.py",)

_CHILD = textwrap.dedent(
    """
    import importlib, json, pathlib, pkgutil, sys, traceback

    FORBIDDEN = sys.argv[1]
    root = pathlib.Path(sys.argv[2])

    class Block:
        # meta path finder that makes FORBIDDEN and its submodules unimportable
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == FORBIDDEN or name.startswith(FORBIDDEN + "."):
                raise ImportError(f"layering: {name} must not be imported by the library", name=name)
            return None

    sys.meta_path.insert(0, Block)
    import mtl_med

    assert pathlib.Path(mtl_med.__file__).resolve().parent == root / "mtl_med", mtl_med.__file__
    failures = {}
    names = ["mtl_med"] + [m.name for m in pkgutil.walk_packages(mtl_med.__path__, "mtl_med.",
                                                                 onerror=lambda n: failures.setdefault(n, "walk"))]
    for name in names:
        try:
            importlib.import_module(name)
        except BaseException:
            failures[name] = traceback.format_exc(limit=-3)

    def strings(node):
        if isinstance(node, str):
            yield node
        elif isinstance(node, dict):
            for v in node.values():
                yield from strings(v)
        elif isinstance(node, list):
            for v in node:
                yield from strings(v)

    configs = sorted(root.glob("bundles/*/configs/**/*.json"))
    statements = 0
    for cfg in configs:
        for s in strings(json.loads(cfg.read_text())):
            if s.startswith(("$import ", "$from ")):
                statements += 1
                try:
                    exec(s[1:], {})
                except BaseException:
                    failures[f"{cfg.relative_to(root)}: {s}"] = traceback.format_exc(limit=-2)
    print(json.dumps({"modules": len(names), "configs": len(configs), "statements": statements,
                      "failures": failures}))
    """
)


def test_library_and_bundles_import_without_data_prep():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    r = subprocess.run([sys.executable, "-c", _CHILD, FORBIDDEN, str(ROOT)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["modules"] > 20 and report["configs"] > 5 and report["statements"] > 5, report
    assert not report["failures"], "\n".join(f"{k}:\n{v}" for k, v in report["failures"].items())


def _imports_forbidden(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else []
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            names = [node.args[0].value]
        else:
            continue
        if any(n == FORBIDDEN or n.startswith(FORBIDDEN + ".") for n in names):
            lines.append(node.lineno)
    return sorted(lines)


def test_no_import_statement_of_data_prep_in_library_source():
    found = {}
    for path in sorted((ROOT / "mtl_med").rglob("*.py")):
        lines = _imports_forbidden(ast.parse(path.read_text(), filename=str(path)))
        if lines:
            found[str(path.relative_to(ROOT))] = lines
    assert not found, f"mtl_med imports {FORBIDDEN} (file: lines): {found}"


def test_the_checks_detect_a_forbidden_import():
    """The AST check sees imports inside functions and through importlib (what the demo once did)."""
    src = "def main():\n    from data_prep.phantoms import PRESETS\n    import importlib\n" \
          "    importlib.import_module('data_prep.landmarks')\nimport data_prep\n"
    assert _imports_forbidden(ast.parse(src)) == [2, 4, 5]
    assert _imports_forbidden(ast.parse("from mtl_med.pelvis.phantoms import PRESETS\nimport data_prepx\n")) == []


def test_leaf_modules_import_nothing_else_from_the_package():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    for leaf in LEAVES:
        code = f"import json, sys, {leaf}; print(json.dumps(sorted(m for m in sys.modules if m.startswith('mtl_med'))))"
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout.strip().splitlines()[-1]) == ["mtl_med", leaf], leaf
    for leaf in LEAVES:  # and no import inside a function body either, but of another leaf (io raises errors')
        path = ROOT / (leaf.replace(".", "/") + ".py")
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                assert node.level == 0 and (not module.startswith("mtl_med") or module in LEAVES), (leaf, node.lineno)
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("mtl_med") and a.name not in LEAVES for a in node.names), (leaf, node.lineno)


# ---- sharing methods stay in their packages ---------------------------------------------------------------------------
def _imports_of(path: Path) -> set[str]:
    """Every module an ``import`` statement of ``path`` names (function bodies included, relative imports resolved,
    ``from X import y`` counted as ``X`` and ``X.y``, ``importlib.import_module("X")`` as ``X``)."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    package = parts if parts[-1] == "__init__" else parts[:-1]
    package = [p for p in package if p != "__init__"]
    return _imports_in(ast.parse(path.read_text(), str(path)), package)


def _imports_in(tree: ast.AST, package: list[str]) -> set[str]:
    """The modules the import statements of ``tree`` name, relative ones resolved against ``package``."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join([*base, *(node.module.split(".") if node.module else [])])
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            out.add(node.args[0].value)
    return out


def _sources():
    for path in sorted((ROOT / "mtl_med").rglob("*.py")):
        yield path.relative_to(ROOT).as_posix(), _imports_of(path)


def _pelvis_imports(mods: set[str]) -> list[str]:
    return sorted(m for m in mods if m == PELVIS or m.startswith(PELVIS + "."))


def test_generic_modules_never_import_the_pelvis_application():
    bad = {}
    for rel, mods in _sources():
        if rel.startswith("mtl_med/pelvis/") or rel in PELVIS_ENTRY_POINTS:
            continue
        if _pelvis_imports(mods):
            bad[rel] = _pelvis_imports(mods)
    assert not bad, f"generic modules import the pelvis application (module: imports): {bad}"
    assert (ROOT / "mtl_med" / "pelvis" / "__init__.py").exists()
    # the package itself uses the generic layers, never the entry points
    inside = {rel: mods for rel, mods in _sources() if rel.startswith("mtl_med/pelvis/")}
    assert inside and not [m for mods in inside.values() for m in mods
                           if m.removeprefix("mtl_med.").split(".")[0] in ("demo", "cli", "serve")]


def test_the_pelvis_check_sees_imports_in_function_bodies_and_relative_ones():
    src = ("import numpy\ndef f():\n    from mtl_med.pelvis import LABEL_TABLE\n    import mtl_med.pelvis.phantoms\n"
           "from .. import pelvis\nimportlib.import_module('mtl_med.pelvis.constants')\n")
    assert _pelvis_imports(_imports_in(ast.parse(src), ["mtl_med", "data"])) == [
        "mtl_med.pelvis", "mtl_med.pelvis.LABEL_TABLE", "mtl_med.pelvis.constants", "mtl_med.pelvis.phantoms"]


def test_no_module_outside_sharing_imports_a_method_package_and_engines_never_import_sharing():
    sharing = ROOT / "mtl_med" / "sharing"
    methods = sorted(p.stem for p in sharing.iterdir() if (p.suffix == ".py" or (p / "__init__.py").exists())
                     and p.stem not in ("__init__", "base", "__pycache__"))
    assert {"sfg", "adashare", "selective", "branched", "routing"} <= set(methods), methods
    allowed = {"mtl_med/build.py", "mtl_med/sharing/__init__.py"}
    bad = {}
    for rel, mods in _sources():
        if rel.startswith("mtl_med/sharing/") and rel != "mtl_med/sharing/__init__.py" or rel in allowed:
            continue
        hits = sorted(m for m in mods if any(m == f"mtl_med.sharing.{k}" or m.startswith(f"mtl_med.sharing.{k}.") for k in methods))
        if rel.startswith("mtl_med/engines/"):
            hits += sorted(m for m in mods if m == "mtl_med.sharing" or m.startswith("mtl_med.sharing."))
        if hits:
            bad[rel] = sorted(set(hits))
    assert not bad, f"modules outside mtl_med/sharing/ reach into a sharing method (or engines into sharing): {bad}"


def test_no_import_circle_among_the_top_level_packages():
    edges: dict[str, set[str]] = {}
    for rel, mods in _sources():
        parts = rel[: -len(".py")].split("/")
        src = "mtl_med" if parts[1] == "__init__" else f"mtl_med.{parts[1]}"
        for m in mods:
            p = m.split(".")
            if p[0] != "mtl_med":
                continue
            dst = f"mtl_med.{p[1]}" if len(p) > 1 and ((ROOT / "mtl_med" / p[1]).is_dir() or (ROOT / "mtl_med" / f"{p[1]}.py").exists()) else "mtl_med"
            if dst != src:
                edges.setdefault(src, set()).add(dst)
    # Tarjan's strongly connected components: a component of more than one package is a circle
    index, low, stack, on, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    assert not circles, f"import circles among mtl_med's top-level packages: {circles}"
