"""A case's identity and the places its outputs may go.

A case is named once, from its input's name, and every writer, ``skip_existing``, the summaries and the DICOM
outputs use that name. The name is the input's file name with only the known image suffix removed (``.nii.gz``,
``.nii``, ...), every other character kept: ``1.2.840.113619.100.nii.gz`` is case ``1.2.840.113619.100``; a DICOM
series folder is named by the folder's own name. Where the file name is only a role (``case_000/mr.nii.gz``), the
parent folder names the case. The name depends on the input's path alone, so a resumed run finds the same names.

A name that cannot be a folder inside the output folder (empty, ``.``, ``..``, a path separator, a control
character, longer than :data:`MAX_NAME_BYTES`) is refused, and so are two inputs of one name (compared as a
case-insensitive file system would: Unicode NFC, case folded), in one line naming both, before any inference.

The cases of a run are listed here too (:func:`list_cases`: a datalist section or the files of a folder).
"""

from __future__ import annotations

import glob
import os
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mtl_med.data.nifti import check_datalist
from mtl_med.errors import InputError

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_NAME_BYTES",
    "case_identity",
    "check_case_name",
    "check_unique_cases",
    "path_inside",
    "case_output_paths",
    "case_names",
    "list_cases",
]

# image suffixes MONAI's readers take; only these are removed from a file name
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".nhdr")
# file names that say only what the file holds: the case is the folder they are in
ROLE_STEMS = frozenset({"mr", "ct", "label", "bone", "image", "img", "t2", "t2w"})
# room for "<case>_seg_uncertainty.nii.gz" and the private ".<case>.mtl_med-<host>-<pid>.tmp" within NAME_MAX (255)
MAX_NAME_BYTES = 128
# the infix of the private folders of a run being written (inference.publish.private_temp): never a case name's
RESERVED_INFIX = ".mtl_med-"


def case_identity(path: str | os.PathLike) -> str:
    """The case name of an input file or DICOM series folder (see the module docstring); not yet checked."""
    p = Path(path)
    name = p.name
    if p.is_dir():
        return name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            stem = name[: -len(suffix)]  # may be empty or '..': check_case_name refuses those
            return p.parent.name if stem.lower() in ROLE_STEMS and p.parent.name else stem
    return name


def check_case_name(name: Any, source: Any) -> str:
    """``name`` if it can name a folder inside the output folder, else an :class:`InputError` naming ``source``
    (the input file or the datalist) and the problem."""
    if not isinstance(name, str):
        raise InputError(source, f"case name must be text, got {type(name).__name__} {name!r}")
    problem = None
    if name in ("", ".", ".."):
        problem = "is empty, '.' or '..'"
    elif "/" in name or "\\" in name or (os.altsep and os.altsep in name):
        problem = "contains a path separator"
    elif any(unicodedata.category(c) == "Cc" for c in name):
        problem = "contains a control character"
    elif len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        problem = f"is longer than {MAX_NAME_BYTES} bytes"
    elif RESERVED_INFIX in name:
        problem = f"contains {RESERVED_INFIX!r}, which marks a run's private folders"
    if problem:
        raise InputError(source, f"case name {name!r} {problem}: rename the input or give the datalist item a "
                                 '"name" that can be a folder name')
    return name


def _folded(name: str) -> str:
    return unicodedata.normalize("NFC", name).casefold()


def check_unique_cases(items: Iterable[Mapping[str, Any]]) -> None:
    """Refuse two items (``{"name", "mr"}``) of one case name, in one line naming both inputs: their outputs
    would go to one folder."""
    seen: dict[str, Mapping[str, Any]] = {}
    for item in items:
        key = _folded(item["name"])
        if key in seen:
            first = seen[key]
            raise InputError(item["mr"], f"case name {item['name']!r} is also the case name of {first['mr']} "
                                         f"({first['name']!r}); their outputs would mix: rename one, or give "
                                         'datalist items a "name" of their own')
        seen[key] = item


def path_inside(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path`` resolved, if it lies inside the folder ``root`` (not ``root`` itself), else an :class:`InputError`:
    no output is written outside the output folder, whatever the names."""
    root_r, path_r = Path(root).resolve(), Path(path).resolve()
    if path_r == root_r or root_r not in path_r.parents:
        raise InputError(path, f"output path is not inside the output folder {root_r}")
    return path_r


def case_output_paths(root: str | os.PathLike, case: str, names: Mapping[str, str]) -> dict[str, Path]:
    """``{key: root/<case>/<case>_<name>}`` for ``names`` (key -> what follows ``"<case>_"``, e.g.
    ``"sct.nii.gz"``): MONAI ``SaveImage``'s separate-folder layout with the case name kept whole (MONAI's
    ``FolderLayout`` cuts a name at its first dot). The case folder is checked to be a child of ``root``, and
    every file a child of the case folder, before anything is written.

    Raises:
        InputError: a case name that cannot be a folder name, or a file name that leaves the case folder.
    """
    root = Path(root).expanduser().resolve()
    case_dir = root / check_case_name(case, root)
    if path_inside(root, case_dir).parent != root:
        raise InputError(case_dir, f"case folder is not directly inside the output folder {root}")
    paths = {key: case_dir / f"{case}_{name}" for key, name in names.items()}
    for path in paths.values():
        if path_inside(case_dir, path).parent != case_dir:
            raise InputError(path, f"output file is not directly inside the case folder {case_dir}")
    return paths


def case_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Case names of inputs (:func:`case_identity`), each checked, and refused when two
    are one (:func:`check_unique_cases`)."""
    names = [check_case_name(case_identity(p), p) for p in paths]
    check_unique_cases({"name": n, "mr": str(p)} for n, p in zip(names, paths))
    return names


def list_cases(
    input_dir: str | os.PathLike | None = None,
    datalist: str | os.PathLike | Mapping | None = None,
    section: str = "test",
    pattern: str = "*.nii*",
) -> list[dict]:
    """Items ``{"name", "mr", ["ct", "label", "bone"]}`` from a datalist section (takes precedence) or from
    the files matching ``pattern`` in ``input_dir`` and its DICOM series folders (exactly ``input_dir`` when it
    is a file or holds DICOM files; relative paths resolve against the current directory). Case names are the
    datalist's ``name`` values or the inputs' identities (:mod:`mtl_med.inference.cases`), checked and unique.

    Raises:
        InputError: a missing input, no inputs, a name that cannot be a folder, two inputs of one name.
    """
    from mtl_med.data.dicom import is_series_folder, series_folders

    if datalist:
        if isinstance(datalist, (str, os.PathLike)):  # relative to the current directory
            datalist = Path(datalist).expanduser().resolve()
        items = check_datalist(datalist, sections=(section,))[section]
    elif input_dir:
        root = Path(input_dir).expanduser().resolve()
        if not root.exists():
            raise InputError(root, "input file or folder does not exist")
        if root.is_file() or is_series_folder(root):  # exactly this input
            files = [str(root)]
        else:
            # the folder's own name is no pattern: brackets in it must not glob
            files = sorted(str(root / p) for p in glob.glob(pattern, root_dir=root, recursive=True) if (root / p).is_file())
            files += [str(p) for p in series_folders(root)]
        if not files:
            raise InputError(root, f"no files matching {pattern!r} and no DICOM series folders")
        items = [{"mr": f} for f in files]
    else:
        raise ValueError("give input_dir or datalist")
    items = [dict(x) for x in items]
    for item in items:
        source = datalist if datalist and "name" in item else item["mr"]
        name = item["name"] if "name" in item else case_identity(item["mr"])
        item["name"] = check_case_name(name, source if isinstance(source, (str, os.PathLike)) else "<datalist dict>")
    check_unique_cases(items)
    return items

