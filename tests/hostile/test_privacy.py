"""No path component of an input reaches a store, a log, an export or an image: prepare and
predict run on folders named like patients, and every file they write (PNG text included),
every log record and every text drawn into the overlay is searched for those names."""

from __future__ import annotations

import gzip
import logging
import shutil
from pathlib import Path

import pytest
from inputs import dicom_copy, dicom_with_garbage

NAMES = ("DOE", "JOHN", "PID4711", "ROE", "JANE", "PID0815")


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def lnfm_log():
    handler = Records()
    logger = logging.getLogger("lnfm")
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)


@pytest.fixture
def figure_texts(monkeypatch):
    """Every text artist of every figure saved (titles, labels): what the PNG shows."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    texts: list[str] = []
    original = Figure.savefig

    def savefig(self, *args, **kwargs):
        texts.extend(t.get_text() for t in self.findobj(Text))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    return texts


def _text_bytes(f: Path) -> bytes:
    """The bytes of `f` that can hold text. A NIfTI's are its header and extensions, decompressed (a name in a
    gzipped header would not appear literally in the file); its voxel values are numbers, and a float map's
    bytes spell any three letters somewhere by chance."""
    if f.name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        data = gzip.decompress(f.read_bytes()) if f.name.endswith(".gz") else f.read_bytes()
        return data[:int(nib.load(str(f)).dataobj.offset)]  # where the voxel values start
    return f.read_bytes()


def assert_nothing_names_a_patient(files: list[Path], texts: list[str]) -> None:
    assert files, "nothing was written"
    for name in NAMES:
        for f in files:
            assert name.encode() not in _text_bytes(f), (name, f)
        for t in texts:
            assert name not in t, (name, t)


def _patients(root: Path) -> Path:
    """Two patient folders: one real series, one with a broken slice (a failure to record)."""
    dicom_copy(root / "DOE_JOHN_PID4711" / "CT_DOE^JOHN")
    shutil.rmtree(root / "ROE_JANE_PID0815", ignore_errors=True)
    dicom_with_garbage(root / "ROE_JANE_PID0815" / "series")
    return root


def test_prepare_from_patient_named_folders_writes_no_name(tmp_path, lnfm_log, capsys, shared_data):  # its DICOM
    from lnfm.data.prepare import main
    from lnfm.data.store import read_failures, read_manifest

    root = _patients(tmp_path / "PATIENTS_DOE_JOHN_PID4711")
    store = tmp_path / "store"
    rc = main(["--input", str(root), "--output", str(store), "--workers", "0", "salt=s"])
    printed = capsys.readouterr()
    assert rc == 1  # the broken series is reported ...
    assert any(line.startswith("FAILED ") and "ROE_JANE_PID0815" in line for line in printed.out.splitlines())
    (record,) = read_manifest(str(store))  # ... and the good one converted
    assert record["site"] == "unspecified" and record["case_id"].startswith("c")
    assert len(read_failures(str(store))) == 1
    assert_nothing_names_a_patient([p for p in store.rglob("*") if p.is_file()], lnfm_log.lines)


def test_predict_from_a_patient_named_folder_writes_no_name(world, tmp_path, lnfm_log, figure_texts, capsys):
    from lnfm.__main__ import main

    series = dicom_copy(tmp_path / "DOE_JOHN_PID4711" / "CT_DOE^JOHN_PID4711")
    out = tmp_path / "results"
    rc = main(["predict", "--model", str(world.orbax), "--input", str(series), "--output", str(out / "mask.nii.gz"),
               "--probabilities", str(out / "prob.nii.gz"), "--report", str(out / "nodes.csv"), "--overlay",
               str(out / "preview.png")])
    assert rc == 0, capsys.readouterr().err[-2000:]
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert [p.name for p in files] == ["mask.nii.gz", "nodes.csv", "preview.png", "prob.nii.gz"]
    assert figure_texts and any("lnfm predict" in t for t in figure_texts)
    assert_nothing_names_a_patient(files, figure_texts + lnfm_log.lines)


def test_export_into_a_patient_named_folder_logs_no_name(world, tmp_path, lnfm_log, capsys):
    from lnfm.__main__ import main

    out = tmp_path / "DOE_JOHN_PID4711" / "EX_ROE_JANE_PID0815"
    for fmt in ("orbax", "safetensors"):
        rc = main(["export", "--checkpoint", str(world.workdir), "--out", str(out / fmt), "--format", fmt])
        assert rc == 0, capsys.readouterr().err[-2000:]
    assert any("exported segmenter" in line for line in lnfm_log.lines), lnfm_log.lines
    assert_nothing_names_a_patient([p for p in out.rglob("*") if p.is_file()], lnfm_log.lines)


def test_the_search_finds_a_name_in_a_gzipped_nifti_header(tmp_path):
    """The check above is not vacuous for compressed NIfTI: a name in the header's description is found,
    though gzip hides it from a search of the file's bytes."""
    import numpy as np

    from lnfm.io import write_nifti

    write_nifti(tmp_path / "m.nii.gz", np.zeros((4, 4, 4), np.uint8), np.eye(4), "ROE JANE")
    assert b"ROE" not in (tmp_path / "m.nii.gz").read_bytes()
    with pytest.raises(AssertionError, match="ROE"):
        assert_nothing_names_a_patient([tmp_path / "m.nii.gz"], [])
