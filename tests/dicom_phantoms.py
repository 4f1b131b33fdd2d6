"""DICOM CT series written with pydicom from a phantom volume, with any orientation; a copy of the
real series in ../shared/data with the UIDs its anonymisation blanked restored; and independent
readers of DICOM-SEG (highdicom) and RTSTRUCT (highdicom's patient->image transform, skimage's
polygon fill, even-odd rule) that place every frame by its source file's own position; a count of the
DICOM files pydicom parses."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from skimage.draw import polygon2mask

from lnfm.io.volume import LPS_TO_RAS

REAL_SERIES = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ct" / "totalsegmentator" / \
    "example_ct_dicom"
PATIENT_NAME, PATIENT_ID = "Doe^Jane", "PID-4711-XYZ"


def write_series(folder: Path, hu: np.ndarray, row_dir, col_dir, spacing_rc: tuple[float, float], step,
                 origin, seed: int = 0) -> dict:
    """Write `hu` (X, Y, Z) as one CT file per slice: voxel (i, j, k) sits at
    origin + i * spacing_c * row_dir + j * spacing_r * col_dir + k * step (LPS mm). Files and
    instance numbers are shuffled, so neither gives the slice order. Returns the series UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    uids = {"study": generate_uid(), "series": generate_uid(), "frame": generate_uid()}
    row_dir, col_dir, step, origin = (np.asarray(v, float) for v in (row_dir, col_dir, step, origin))
    order = rng.permutation(hu.shape[2])
    for n, k in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = PATIENT_NAME, PATIENT_ID, "19600101", "F"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids["study"], uids["series"], \
            uids["frame"]
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20250101", "120000", "S1", "ACC-99"
        ds.ReferringPhysicianName = ""
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 3, int(rng.integers(1, 10_000)) * 10 + n
        ds.Manufacturer, ds.PositionReferenceIndicator = "PHANTOM", ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [round(float(v), 6) for v in origin + k * step]
        ds.PixelSpacing = [float(spacing_rc[0]), float(spacing_rc[1])]
        ds.SliceThickness = float(np.linalg.norm(step))
        ds.KVP, ds.AcquisitionNumber = 120, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.PixelData = np.ascontiguousarray(hu[:, :, k].T.astype(np.int16)).tobytes()
        ds.save_as(folder / f"img_{rng.integers(1 << 30):010d}.dcm", enforce_file_format=True)
    return uids


def restored_real_series(folder: Path, patient_name: str = PATIENT_NAME) -> Path:
    """The real 20-slice series with Study/Series/SOP Instance UIDs filled in (its anonymisation
    blanked them; the pixel data and geometry are untouched) and a patient name to trace."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    for n, f in enumerate(sorted(REAL_SERIES.iterdir())):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, \
            ds.file_meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID = patient_name, PATIENT_ID
        ds.save_as(folder / f"{n:03d}.dcm")
    return folder


def read_sources(folder: Path) -> dict[str, pydicom.Dataset]:
    return {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(f, stop_before_pixels=True)
                                             for f in sorted(folder.iterdir()))}


def slice_index(ds: pydicom.Dataset, affine: np.ndarray) -> int:
    """Which slice of the (RAS) volume a source file is, from its own position."""
    ijk = np.linalg.solve(affine, np.append(LPS_TO_RAS[:3, :3] @ np.asarray(ds.ImagePositionPatient, float), 1))
    assert np.allclose(ijk[:2], 0, atol=1e-3)
    return int(round(ijk[2]))


def expected_frame(volume: np.ndarray, ds: pydicom.Dataset, affine: np.ndarray) -> np.ndarray:
    return volume[:, :, slice_index(ds, affine)].T


def seg_frames(path: Path, sources: dict) -> dict[str, np.ndarray]:
    seg = hd.seg.segread(path)
    uids = list(sources)
    pixels = seg.get_pixels_by_source_instance(uids, combine_segments=True, ignore_spatial_locations=False)
    return dict(zip(uids, pixels))


def rasterise_rtstruct(path: Path, sources: dict, affine: np.ndarray, shape) -> dict[str, np.ndarray]:
    """ROI name -> (X, Y, Z) mask: every contour mapped to its slice by highdicom's patient->image
    transform, filled by point-in-polygon and combined by the even-odd rule."""
    rt = pydicom.dcmread(path)
    names = {r.ROINumber: r.ROIName for r in rt.StructureSetROISequence}
    out = {}
    for roi in rt.ROIContourSequence:
        mask = np.zeros(shape, bool)
        for c in roi.ContourSequence:
            assert c.ContourGeometricType == "CLOSED_PLANAR"
            src = sources[c.ContourImageSequence[0].ReferencedSOPInstanceUID]
            tf = hd.spatial.ReferenceToImageTransformer(src.ImagePositionPatient, src.ImageOrientationPatient,
                                                        src.PixelSpacing)
            img = tf(np.asarray(c.ContourData, float).reshape(-1, 3))
            assert np.abs(img[:, 2]).max() < 1e-3  # on the slice plane
            rows_cols = img[:, [1, 0]] - 0.5  # image coordinates put pixel centres at +0.5
            k = slice_index(src, affine)
            mask[:, :, k] ^= polygon2mask((int(src.Rows), int(src.Columns)), rows_cols).T
        out[names[roi.ReferencedROINumber]] = mask
    return out


# Optional patient, study, series and equipment attributes a source may carry, none of which a DICOM output
# needs to reference it: each holds a value found nowhere else, so its absence from an output is checkable
# element by element and byte by byte.
CANARIES = {
    # Patient and Clinical Trial Subject modules
    "OtherPatientNames": "Canary^OtherName", "IssuerOfPatientID": "CANARY-ISSUER-OF-PID",
    "PatientBirthTime": "013713.424242", "PatientComments": "CANARY patient comments",
    "ResponsiblePerson": "Canary^Responsible", "ResponsibleOrganization": "CANARY responsible organisation",
    "EthnicGroup": "CANARYETHNIC", "PatientIdentityRemoved": "NO", "DeidentificationMethod": "CANARY deid method",
    "ClinicalTrialSponsorName": "CANARY sponsor", "ClinicalTrialProtocolID": "CANARY-PROTOCOL-ID",
    "ClinicalTrialSiteName": "CANARY trial site", "ClinicalTrialSubjectID": "CANARY-SUBJECT-ID",
    # Patient Study and Patient Medical modules
    "PatientAge": "047Y", "PatientSize": "1.7874", "PatientWeight": "79.4242", "Occupation": "CANARY-OCCUPY",
    "AdditionalPatientHistory": "CANARY additional history", "MedicalAlerts": "CANARY medical alert",
    "Allergies": "CANARY allergy", "AdmittingDiagnosesDescription": "CANARY admitting diagnosis",
    "AdmissionID": "CANARY-ADMISSION", "SmokingStatus": "YES",
    # General Study and Clinical Trial Study modules
    "StudyDescription": "CANARY study description", "PhysiciansOfRecord": "Canary^OfRecord",
    "NameOfPhysiciansReadingStudy": "Canary^Reader", "ConsultingPhysicianName": "Canary^Consulting",
    "RequestingService": "CANARY requesting service", "ClinicalTrialTimePointID": "CANARY-TIMEPOINT",
    # General Series
    "SeriesDescription": "CANARY series description", "OperatorsName": "Canary^Operator",
    "PerformingPhysicianName": "Canary^Performer", "ProtocolName": "CANARY protocol",
    # General Equipment (the scanner and its site)
    "Manufacturer": "CANARY maker", "ManufacturerModelName": "CANARY model", "SoftwareVersions": "CANARY-SW",
    "DeviceSerialNumber": "CANARY-SERIAL-123", "InstitutionName": "CANARY Hospital",
    "InstitutionAddress": "CANARY Street 1, Canarytown", "InstitutionalDepartmentName": "CANARY Radiology",
    "StationName": "CANARYSTN",
}
CANARY_SEQUENCES = {  # keyword: (item keyword, value)
    "OtherPatientIDsSequence": ("PatientID", "CANARY-OTHER-PID"),
    "ProcedureCodeSequence": ("CodeMeaning", "CANARY procedure code"),
    "ReferencedStudySequence": ("ReferencedSOPInstanceUID", "1.2.826.0.1.3680043.8.498.4242424242"),
}


def add_canaries(folder: Path) -> None:
    """Write CANARIES and CANARY_SEQUENCES into every file of a series folder."""
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        for keyword, value in CANARIES.items():
            setattr(ds, keyword, value)
        for keyword, (inner, value) in CANARY_SEQUENCES.items():
            item = Dataset()
            setattr(item, inner, value)
            if keyword == "OtherPatientIDsSequence":
                item.TypeOfPatientID = "TEXT"
            elif keyword == "ProcedureCodeSequence":
                item.CodeValue, item.CodingSchemeDesignator = "CANARY1", "99CANARY"
            else:
                item.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
            setattr(ds, keyword, [item])
        ds.save_as(f)


def assert_no_canaries(path: Path) -> None:
    """No canary keyword at any level of the DICOM file at `path`, no canary value in any element's value
    (names included) nor anywhere in its bytes."""
    ds = pydicom.dcmread(path)
    equipment = [e.Manufacturer for e in ds.get("ContributingEquipmentSequence", [])]
    own = {"Manufacturer", "ManufacturerModelName", "SoftwareVersions", "DeviceSerialNumber", "SeriesDescription",
           "OperatorsName"}  # attributes the output has of its own (its maker, its series): checked by value
    values = [v for k, v in CANARIES.items() if len(v) > 4]  # "NO", "YES", "047Y" may occur by chance
    for elem in ds.iterall():
        assert elem.keyword not in (set(CANARIES) - own) | set(CANARY_SEQUENCES), (path.name, elem.keyword,
                                                                                    equipment)
        if elem.VR not in ("OB", "OW", "UN", "SQ"):
            text = str(elem.value)
            assert not any(v in text for v in values), (path.name, elem.keyword, text)
            assert not any(v in text for _, v in CANARY_SEQUENCES.values()), (path.name, elem.keyword, text)
    raw = path.read_bytes()
    for v in [*values, *(v for _, v in CANARY_SEQUENCES.values()), "Canary", "CANARY"]:
        assert v.encode() not in raw, (path.name, v)


def count_reads(monkeypatch, root: Path) -> dict[str, list[int]]:
    """{file: [header-only reads, whole reads]} of pydicom.dcmread's calls on the files under `root` from now on."""
    reads: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    real = pydicom.dcmread

    def counted(fp, *args, **kwargs):
        path = Path(fp).absolute() if isinstance(fp, (str, os.PathLike)) else None
        if path is not None and path.is_relative_to(root.absolute()):
            reads[str(path.relative_to(root.absolute()))][0 if kwargs.get("stop_before_pixels") else 1] += 1
        return real(fp, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", counted)
    return reads


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def forget_headers(monkeypatch) -> None:
    """This process's DICOM header caches empty, as a fresh process's (`lnfm.io.dicom.slice_header`)."""
    from lnfm.io import dicom

    monkeypatch.setattr(dicom, "_HEADERS", dicom._Newest(dicom.HEADER_CACHE_FILES))
    monkeypatch.setattr(dicom, "_UIDS", dicom._Newest(dicom.UID_CACHE_FILES))
