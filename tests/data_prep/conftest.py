"""Fixtures for the data_prep tests: small phantoms and a tiny Gold Atlas-like DICOM tree."""

import datetime

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
RTSTRUCT = "1.2.840.10008.5.1.4.1.1.481.3"


def _base(sop_class, modality, study, frame, series, description):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.FrameOfReferenceUID = frame
    ds.SeriesDescription = description
    ds.PatientID = "phantom"
    ds.PatientName = "Phantom^Pelvis"
    ds.StudyDate = datetime.date(2020, 1, 1).strftime("%Y%m%d")
    return ds


def write_series(folder, prefix, volume, spacing, origin, modality, description, study, frame):
    """volume: (z, y, x) int16; LPS origin; axial slices, identity directions."""
    series = generate_uid()
    for k in range(volume.shape[0]):
        ds = _base(CT_IMAGE if modality == "CT" else MR_IMAGE, modality, study, frame, series, description)
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(origin[0]), float(origin[1]), float(origin[2] + k * spacing[2])]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [float(spacing[1]), float(spacing[0])]
        ds.SliceThickness = float(spacing[2])
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(volume[k], dtype=np.int16).tobytes()
        ds.save_as(folder / f"{prefix}{k:03d}.dcm", enforce_file_format=True)
    return series


def write_rtstruct(path, rois, study, frame):
    """rois: name -> list of (N, 3) LPS contour points."""
    ds = _base(RTSTRUCT, "RTSTRUCT", study, frame, generate_uid(), "RTSTRUCT consensus")
    ds.StructureSetLabel = "atlas"
    ds.StructureSetROISequence = []
    ds.ROIContourSequence = []
    for i, (name, contours) in enumerate(rois.items(), start=1):
        r = Dataset()
        r.ROINumber = i
        r.ROIName = name
        r.ReferencedFrameOfReferenceUID = frame
        ds.StructureSetROISequence.append(r)
        rc = Dataset()
        rc.ReferencedROINumber = i
        rc.ContourSequence = []
        for pts in contours:
            c = Dataset()
            c.ContourGeometricType = "CLOSED_PLANAR"
            c.NumberOfContourPoints = len(pts)
            c.ContourData = [float(v) for v in np.asarray(pts).ravel()]
            rc.ContourSequence.append(c)
        ds.ROIContourSequence.append(rc)
    ds.save_as(path, enforce_file_format=True)


def square(cx, cy, z, half):
    return np.array([[cx - half, cy - half, z], [cx + half, cy - half, z], [cx + half, cy + half, z],
                     [cx - half, cy + half, z]])


# organ squares (LPS mm centre x, y, half size) on slices 1..3 of a 32 x 32 x 5 grid of 2 mm, origin 0
ORGANS = {
    "Femur_Head_L": (50.0, 30.0, 5.0),  # LPS +x is the patient's left
    "Femur_Head_R": (10.0, 30.0, 5.0),
    "Prostate": (30.0, 20.0, 3.0),
    "Bladder": (30.0, 45.0, 6.0),
    "Rectum": (30.0, 8.0, 3.0),
}


@pytest.fixture
def goldatlas_tree(tmp_path):
    """One patient folder laid out like the Gold Atlas: MR T1, MR T2, CT, deformed CT, RTSTRUCT with an
    observer and a consensus contour per organ."""

    def make(root=None, patient="1_01_P", with_rtstruct=True, roi_names=None, ct_offset=0.0):
        root = root or tmp_path / "goldatlas"
        folder = root / patient
        folder.mkdir(parents=True)
        study, frame = generate_uid(), generate_uid()
        rng = np.random.default_rng(0)
        shape = (5, 32, 32)
        mr = (200 + 50 * rng.random(shape)).astype(np.int16)
        ct = (40 + 10 * rng.random(shape)).astype(np.int16)
        ct[:, :2] = -1000
        write_series(folder, "mrt1_", mr, (2.0, 2.0, 2.0), (0, 0, 0), "MR", "T1 TSE", study, frame)
        write_series(folder, "mrt2_", mr, (2.0, 2.0, 2.0), (0, 0, 0), "MR", "T2 TSE axial", study, frame)
        write_series(folder, "ct_", ct, (2.0, 2.0, 2.0), (0, 0, 0), "CT", "CT pelvis", study, frame)
        write_series(folder, "dct_", ct, (2.0, 2.0, 2.0), (ct_offset, 0, 0), "CT", "CT deformed to MR", study, frame)
        if with_rtstruct:
            rois = {}
            for name, (cx, cy, h) in ORGANS.items():
                for suffix in ("_obs1", "_consensus"):
                    rois[(roi_names or {}).get(name, name) + suffix] = [square(cx, cy, 2.0 * k, h) for k in (1, 2, 3)]
            write_rtstruct(folder / "rtstruct.dcm", rois, study, frame)
        (folder / "README.txt").write_text("not a DICOM file")
        return root, folder

    return make


@pytest.fixture
def organs():
    return dict(ORGANS)
