"""Layering: the library (mtl_med) and its bundles never import the command-line tools (data_prep).

data_prep -> mtl_med is the only allowed direction. Checked three ways, because a module-level import test
alone misses imports made inside functions (the demo once imported ``data_prep.phantoms`` in ``main``) and
imports made by bundle configs (``"$from data_prep.landmarks import ..."`` in train.json):

* every module under mtl_med imports in a fresh interpreter in which ``data_prep`` cannot be imported;
* every ``"$import ..."`` / ``"$from ... import ..."`` expression of every bundle config runs there too;
* no import statement anywhere in mtl_med's source (function bodies included) names data_prep.

Within mtl_med, the errors, the atomic writers and the pelvis constants are leaves: importing one of them
imports no other module of the package, so any module can use them without an import cycle (the writers raise
the errors' classes, imported where they raise: a leaf may use another leaf).
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
LEAVES = ("mtl_med.errors", "mtl_med.io", "mtl_med.pelvis")

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
    assert _imports_forbidden(ast.parse("from mtl_med.data.phantoms import PRESETS\nimport data_prepx\n")) == []


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
