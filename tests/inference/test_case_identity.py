"""A case has one identity, derived from its input's name alone, and every output path stays inside the output
folder: names with dots, spaces, unicode, brackets, '.' / '..', separators or great length are either kept whole
and unique or refused in one line, before anything is written."""

from __future__ import annotations

import string
import unicodedata
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from mtl_med.errors import InputError
from mtl_med.inference.cases import (
    MAX_NAME_BYTES,
    case_identity,
    case_output_paths,
    check_case_name,
    check_unique_cases,
)
from mtl_med.inference.cases import list_cases
from mtl_med.inference.writer import DICOM_OUTPUTS

OUTPUT_NAMES = {"sct": "sct.nii.gz", "seg": "seg.nii.gz", "sct_std": "sct_std.nii.gz",
                "seg_uncertainty": "seg_uncertainty.nii.gz", "overview": "overview.png", **dict(DICOM_OUTPUTS.values())}

# what input names hold in practice and what a hostile one adds: dots (DICOM UIDs), spaces, unicode (NFC and
# NFD forms, case pairs), brackets (glob), separators, control characters
ALPHABET = st.sampled_from(list(string.ascii_letters + string.digits) + list(". -_[]*?/\\\t\n") +
                           ["é", "e\u0301", "ß", "SS", "Ω", "日", "\u00a0", "\x00", ".."])
NAMES = st.one_of(
    st.lists(ALPHABET, max_size=12).map("".join),
    st.sampled_from(["", ".", "..", "...", "a/.", "zz/.", "../x", "1.2.840.113619.100", "pat.v1", "x" * 200]),
    st.text(max_size=40),
)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _accepted(name: str) -> bool:
    try:
        check_case_name(name, "<test>")
    except InputError:
        return False
    return True


@SETTINGS
@given(name=NAMES)
def test_every_output_path_is_inside_the_output_folder_or_the_name_is_refused(tmp_path, name):
    root = tmp_path / "out"
    try:
        paths = case_output_paths(root, name, OUTPUT_NAMES)
    except InputError as err:
        assert "\n" not in str(err).replace(repr(name), "")  # one line (the name's own newlines are escaped)
        assert not _accepted(name)
        return
    for path in paths.values():
        assert path.parent == root.resolve() / name  # in the case's own folder, directly inside the output folder
        assert path.name.startswith(f"{name}_")  # the name kept whole: nothing cut at a dot
        assert len(path.name.encode("utf-8", "surrogateescape")) <= 255
    assert len(set(paths.values())) == len(paths)


# names a folder can have: what two inputs might share after case folding or Unicode normalisation
FOLDER_NAMES = st.lists(st.sampled_from(list("aAbB.1 -_[]") + ["é", "e\u0301", "ß", "SS", "ss", "Ω", "ω"]),
                        min_size=1, max_size=6).map("".join).filter(lambda n: n not in (".", ".."))


@SETTINGS
@given(a=FOLDER_NAMES, b=FOLDER_NAMES)
def test_two_accepted_names_share_a_folder_only_when_refused_together(tmp_path, a, b):
    assume(_accepted(a) and _accepted(b))
    items = [{"name": a, "mr": "first.nii.gz"}, {"name": b, "mr": "second.nii.gz"}]
    folders = {case_output_paths(tmp_path, n, OUTPUT_NAMES)["sct"].parent for n in (a, b)}
    same = unicodedata.normalize("NFC", a).casefold() == unicodedata.normalize("NFC", b).casefold()
    if same:  # one folder on a case-insensitive or normalising file system: refused, naming both inputs
        with pytest.raises(InputError) as info:
            check_unique_cases(items)
        assert "first.nii.gz" in str(info.value) and "second.nii.gz" in str(info.value)
    else:
        check_unique_cases(items)
        assert len(folders) == 2


FILE_NAMES = st.lists(ALPHABET.filter(lambda c: c not in ("/", "\x00")), min_size=0, max_size=14).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stems=st.lists(FILE_NAMES, min_size=1, max_size=4))
def test_listed_inputs_keep_their_names_or_the_listing_is_refused(tmp_path_factory, stems):
    folder = tmp_path_factory.mktemp("inputs")
    made = []
    for stem in stems:
        name = f"{stem}.nii.gz"
        # dot files are not matched by the folder's glob, as in a shell; role names take the folder's name
        if len(name.encode()) > 255 or (folder / name).exists() or name.startswith(".") or stem.lower() in ("mr", "ct", "image"):
            continue
        try:
            (folder / name).write_bytes(b"")
        except OSError:
            continue
        made.append(stem)
    assume(made)
    try:
        items = list_cases(input_dir=folder, pattern="*.nii.gz")
    except InputError:
        folded = {unicodedata.normalize("NFC", s).casefold() for s in made}
        assert any(not _accepted(s) for s in made) or len(folded) < len(made)
        return
    assert sorted(x["name"] for x in items) == sorted(made)  # each file its own name, nothing cut or renamed


@pytest.mark.parametrize("name, case", [
    ("1.2.840.113619.100.nii.gz", "1.2.840.113619.100"),
    ("pat.v1.nii.gz", "pat.v1"),
    ("pat.v1.nii", "pat.v1"),
    ("scan[1].NII.GZ", "scan[1]"),
    ("my scan é.nii.gz", "my scan é"),
    ("...nii.gz", ".."),
])
def test_only_the_known_suffix_is_removed(tmp_path, name, case):
    (tmp_path / name).write_bytes(b"")
    assert case_identity(tmp_path / name) == case


def test_a_role_file_name_takes_its_folders_name(tmp_path):
    (tmp_path / "case_007").mkdir()
    assert case_identity(tmp_path / "case_007" / "mr.nii.gz") == "case_007"
    (tmp_path / "1.2.3.4").mkdir()  # a DICOM series folder: its own name, dots kept
    assert case_identity(tmp_path / "1.2.3.4") == "1.2.3.4"


def _nifti(path: Path) -> Path:
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), str(path))
    return path


def test_uid_named_inputs_are_two_cases(tmp_path):
    for uid in ("1.2.840.113619.100", "1.2.840.113619.200"):
        _nifti(tmp_path / f"{uid}.nii.gz")
    assert [x["name"] for x in list_cases(input_dir=tmp_path)] == ["1.2.840.113619.100", "1.2.840.113619.200"]


@pytest.mark.parametrize("stem", [".", ".."])
def test_a_dot_name_is_refused_before_anything_runs(tmp_path, stem):
    bad = _nifti(tmp_path / f"{stem}.nii.gz")
    with pytest.raises(InputError) as info:  # the file named on the command line (a folder's glob skips dot files)
        list_cases(input_dir=bad)
    assert str(bad) in str(info.value) and "'.'" in str(info.value)


@pytest.mark.parametrize("name", ["zz/.", "..", "a/b", "", "x" * (MAX_NAME_BYTES + 1), "a\nb", "a.mtl_med-host-1.tmp"])
def test_datalist_names_that_cannot_be_a_folder_are_refused(tmp_path, name):
    mr = _nifti(tmp_path / "scan.nii.gz")
    datalist = {"test": [{"mr": str(mr), "name": name}]}
    with pytest.raises(InputError):
        list_cases(datalist=datalist)


def test_two_inputs_of_one_name_are_refused_naming_both(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        _nifti(tmp_path / sub / "scan.nii.gz")
    with pytest.raises(InputError) as info:
        list_cases(input_dir=tmp_path, pattern="**/*.nii.gz")
    msg = str(info.value)
    assert str(tmp_path / "a" / "scan.nii.gz") in msg and str(tmp_path / "b" / "scan.nii.gz") in msg


def test_a_file_input_is_exactly_that_file(tmp_path):
    target = _nifti(tmp_path / "scan[1].nii.gz")
    _nifti(tmp_path / "scan1.nii.gz")  # what the glob 'scan[1].nii.gz' matches
    series = tmp_path / "series"
    series.mkdir()
    from mtl_med.data.dicom import write_mr_series

    write_mr_series(np.zeros((4, 4, 2), np.float32), np.eye(4), series)
    items = list_cases(input_dir=target)
    assert [(x["name"], x["mr"]) for x in items] == [("scan[1]", str(target))]


def test_a_folder_with_brackets_in_its_name_lists_its_files(tmp_path):
    folder = tmp_path / "cohort[2024]"
    folder.mkdir()
    _nifti(folder / "a.nii.gz")
    assert [x["name"] for x in list_cases(input_dir=folder)] == ["a"]


def test_a_missing_input_file_is_named_as_such(tmp_path):
    with pytest.raises(InputError) as info:
        list_cases(input_dir=tmp_path / "nope.nii.gz")
    assert "nope.nii.gz" in str(info.value) and "input file or folder does not exist" in str(info.value)
