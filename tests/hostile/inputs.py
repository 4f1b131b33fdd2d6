"""Builders of hostile input files: phantoms written with nibabel, pydicom and pynrrd, and
copies or alterations of the real files in ../shared/data."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.uid import generate_uid

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data"
REAL_CT = SHARED / "ct/totalsegmentator/example_ct_sm.nii.gz"  # 122 x 101 x 30, 3 mm
REAL_DICOM = SHARED / "dicom_small/lungmask"  # two real 512 x 512 slices, one series
NONUNIFORM_DICOM = SHARED / "dicom_small/monai_ct_dicom"
LN_MASKS = SHARED / "ln_masks/NIH_LN_MED"
AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


def body(shape=(40, 36, 24), seed=0) -> tuple[np.ndarray, np.ndarray]:
    """int16 HU phantom (air, an ellipse of soft tissue, one 'node') and its uint8 label."""
    rng = np.random.default_rng(seed)
    x, y, _ = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    c = [(s - 1) / 2 for s in shape]
    inside = ((x - c[0]) / (0.35 * shape[0])) ** 2 + ((y - c[1]) / (0.35 * shape[1])) ** 2 <= 1
    image = np.where(inside, 40, -1000).astype(np.int16) + rng.integers(-5, 5, shape).astype(np.int16)
    label = np.zeros(shape, np.uint8)
    label[18:23, 16:21, 10:15] = 1
    image[label > 0] = 70
    return image, label


def nii(path: Path, data: np.ndarray, affine=AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.asarray(affine, float)), str(path))
    return path


def nii_forms(path: Path, data: np.ndarray, qform=None, sform=None) -> Path:
    """A NIfTI with its qform and sform set by hand (None: that form's code 0) and pixdim 1.5 x 1.5 x 2 mm
    where neither is set (so that only the orientation is missing)."""
    img = nib.Nifti1Image(data, None)
    img.header.set_qform(qform, code=0 if qform is None else 1)
    img.header.set_sform(sform, code=0 if sform is None else 1)
    if qform is None and sform is None:
        img.header.set_zooms(np.diag(AFFINE)[:3])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


MIRRORED_X = AFFINE @ np.diag([-1.0, 1, 1, 1])  # AFFINE with its x axis reversed


def csv_file(path: Path, rows: list[dict]) -> Path:
    fields = sorted({k for r in rows for k in r}, key=lambda k: ["case_id", "image", "label"].index(k)
                    if k in ("case_id", "image", "label") else 9)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    return path


def one_case_csv(inp: Path, image: Path | str, label: Path | str | None = None, case_id: str = "c1") -> Path:
    row = {"case_id": case_id, "image": str(image)}
    if label is not None:
        row["label"] = str(label)
    return csv_file(inp / "cases.csv", [row])


def good_pair(inp: Path, name: str = "good") -> tuple[Path, Path]:
    image, label = body()
    return nii(inp / f"{name}.nii.gz", image), nii(inp / f"{name}_label.nii.gz", label)


def nnunet(inp: Path, n: int = 2) -> Path:
    root = inp / "raw"
    for i in range(n):
        image, label = body(seed=i)
        nii(root / "imagesTr" / f"case{i}_0000.nii.gz", image)
        nii(root / "labelsTr" / f"case{i}.nii.gz", label)
    (root / "dataset.json").write_text('{"channel_names": {"0": "CT"}, "labels": {"background": 0, "ln": 1}, '
                                       '"file_ending": ".nii.gz"}')
    return root


def dicom_copy(folder: Path, src: Path = REAL_DICOM) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.is_file() and f.name != "LICENSE":
            shutil.copy(f, folder / f.name)
    return folder


def two_series(folder: Path) -> tuple[Path, str, str]:
    """The real lungmask pair plus a second series half a slice gap above it (other UID)."""
    dicom_copy(folder)
    first, second = (pydicom.dcmread(folder / n) for n in ("0.dcm", "1.dcm"))
    uid_a, uid_b = str(first.SeriesInstanceUID), generate_uid()
    gap = abs(float(second.ImagePositionPatient[2]) - float(first.ImagePositionPatient[2]))
    for name, ds in (("0.dcm", first), ("1.dcm", second)):
        ds.SeriesInstanceUID = uid_b
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ipp = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + gap / 2]
        ds.save_as(folder / f"b{name}")
    return folder, uid_a, uid_b


def dicom_edited(change, extra_slice: bool = False):
    """The real lungmask pair (a third slice one gap further with `extra_slice`), each header changed by
    `change(ds, n)`: geometry a scanner never writes."""
    def build(inp: Path) -> tuple[Path, Path]:
        folder = dicom_copy(inp / "d")
        if extra_slice:
            ds = pydicom.dcmread(folder / "1.dcm")
            ipp = [float(v) for v in ds.ImagePositionPatient]
            ds.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + 1.0]
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(folder / "2.dcm")
        for n, f in enumerate(sorted(folder.iterdir())):
            ds = pydicom.dcmread(f)
            change(ds, n)
            ds.save_as(f)
        return folder, folder
    return build


def dicom_with_garbage(folder: Path) -> Path:
    dicom_copy(folder)
    (folder / "2.dcm").write_bytes(b"DICM? no" * 50)
    return folder


def nhdr(folder: Path, data_file: str, shape=(40, 36, 24)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    header = folder / "scan.nhdr"
    header.write_text("NRRD0004\ntype: int16\ndimension: 3\nspace: right-anterior-superior\n"
                      f"sizes: {shape[0]} {shape[1]} {shape[2]}\n"
                      "space directions: (1.5,0,0) (0,1.5,0) (0,0,2)\nspace origin: (0,0,0)\n"
                      f"endian: little\nencoding: raw\ndata file: {data_file}\n\n")
    return header


def outside_secret(inp: Path) -> Path:
    """A file outside the scan folder whose bytes would read as a plausible volume."""
    image, _ = body()
    secret = inp / "secret.bin"
    secret.write_bytes(np.asfortranarray(image).tobytes(order="F"))
    return secret


def real_ct(inp: Path) -> Path:
    return Path(shutil.copy(REAL_CT, inp / "real_ct.nii.gz"))


def real_hu(inp: Path) -> np.ndarray:
    """The real CT's voxels (int16 HU, -1100..1207)."""
    return np.asarray(nib.load(real_ct(inp)).dataobj)


def nrrd_in_units(inp: Path, unit: str) -> Path:
    """The phantom body as an NRRD whose header gives `unit` for each world axis."""
    import nrrd

    image, _ = body()
    path = inp / "bad.nrrd"
    nrrd.write(str(path), image, {"space": "right-anterior-superior", "space directions": np.diag([1.5, 1.5, 2.0]),
                                  "space origin": np.zeros(3), "space units": [unit] * 3}, index_order="F")
    return path


def not_hu_scans() -> list:
    """(id, voxels written under `inp`, what the refusal says) of CTs that are not in HU: the phantom body
    and the real CT times 10 and divided by 10. Prepare and predict read them through the same checks."""
    image, _ = body()
    return [("hu-times-10", lambda inp: image * np.int16(10),
             ("values down to -10040", "not Hounsfield units (scaled by 10")),
            ("hu-divided-by-10", lambda inp: image / np.float32(10),
             ("no voxel below -500 HU", "not Hounsfield units (divided by 10?)")),
            ("real-ct-times-10", lambda inp: real_hu(inp) * np.int16(10), ("values down to -10790", "scaled by 10")),
            ("real-ct-divided-by-10", lambda inp: real_hu(inp).astype(np.float32) / 10,
             ("no voxel below -500 HU", "divided by 10"))]


def real_ln_mask(inp: Path) -> Path:
    """One real lymph-node mask (float32 {0,1} on its real grid) unzipped."""
    import zipfile

    src = sorted(LN_MASKS.glob("*.zip"))[0]
    with zipfile.ZipFile(src) as z:
        name = next(n for n in z.namelist() if n.endswith((".nii.gz", ".nii")))
        target = inp / Path(name).name
        target.write_bytes(z.read(name))
    return target


def labelled_store(raw: Path, store: Path, splits=("train", "train", "val", "test"), prefix: str = "ft",
                   copy_of: dict[int, int] | None = None, label_of=None, spacing=None) -> str:
    """A prepared store of `body` phantoms (raw files under `raw`), case i in split splits[i]; case i in
    `copy_of` is a copy of case copy_of[i]'s scan (the same scan under another id, saved uncompressed: prepare
    fails a byte-for-byte copy); `label_of(i, label)` alters a case's label; `spacing` resamples (None: the
    phantoms' own)."""
    from lnfm.data.prepare import PrepareConfig, prepare_dataset

    copy_of = copy_of or {}
    rows = []
    for i, split in enumerate(splits):
        image, label = body(seed=copy_of.get(i, i))
        label = label_of(i, label) if label_of else label
        ext = ".nii" if i in copy_of else ".nii.gz"
        rows.append({"case_id": f"{prefix}{i}", "image": nii(raw / f"{prefix}{i}{ext}", image),
                     "label": nii(raw / f"{prefix}{i}_label{ext}", label), "split": split})
    res = prepare_dataset(str(csv_file(raw / "cases.csv", rows)), str(store),
                          PrepareConfig(workers=0, salt="s", spacing=spacing), show_progress=False)
    assert res.ok, res.failures
    return str(store)
