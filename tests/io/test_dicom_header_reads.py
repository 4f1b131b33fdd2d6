"""Each slice of a DICOM series is parsed twice at most: its header once, to find the series, and the whole
file once, for its pixels. Finding the series again to read it, and writing DICOM outputs onto it, reuse
that header while the file is unchanged (`lnfm.io.dicom.slice_header`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_phantoms import count_reads, files_under, forget_headers, restored_real_series
from pydicom.pixels import apply_rescale

from lnfm.data import prepare as prep
from lnfm.data.cases import discover
from lnfm.data.prepare import PrepareConfig, prepare_dataset
from lnfm.io import dicom, read_image
from lnfm.io.dicom_source import read_source_series

SERIES = ("ct", "lung")


@pytest.fixture
def batch(shared_data, tmp_path, monkeypatch):
    """A folder of the real series, one subfolder each (the CT with the UIDs its anonymisation blanked), with
    this process's header caches empty."""
    restored_real_series(tmp_path / "in" / "ct")
    shutil.copytree(shared_data / "dicom_small/lungmask", tmp_path / "in" / "lung",
                    ignore=shutil.ignore_patterns("LICENSE"))
    forget_headers(monkeypatch)
    return tmp_path / "in"


def stacked_by_pydicom(folder: Path) -> np.ndarray:
    """(X, Y, Z) HU as pydicom gives each slice (rescaled), sorted along the slice normal."""
    slices = [pydicom.dcmread(f) for f in folder.iterdir()]
    iop = np.asarray(slices[0].ImageOrientationPatient, float)
    slices.sort(key=lambda ds: float(np.dot(ds.ImagePositionPatient, np.cross(iop[:3], iop[3:]))))
    return np.stack([apply_rescale(ds.pixel_array, ds).T for ds in slices], axis=-1)


def test_prepare_reads_each_header_once_and_each_file_once(batch, tmp_path, monkeypatch):
    reads = count_reads(monkeypatch, batch)
    res = prepare_dataset(str(batch), str(tmp_path / "store"), PrepareConfig(workers=0, salt="s"),
                          show_progress=False)
    assert res.converted == 2, res.failures
    assert dict(reads) == {f: [1, 1] for f in files_under(batch)}  # before: headers 3 times (find, id, read)


def test_a_worker_process_finds_the_series_by_what_prepare_read(batch, tmp_path, monkeypatch):
    """prepare's workers are spawned: each is handed the SeriesInstanceUIDs read to find its case."""
    cases, errors = discover(str(batch), salt="s")
    assert not errors and len(cases) == 2
    handed = [(c, dicom.known_series_uids(c.images[0])) for c in cases]
    assert [len(known) for _, known in handed] == [20, 2]
    forget_headers(monkeypatch)  # as in a fresh process
    reads = count_reads(monkeypatch, batch)
    cfg = PrepareConfig(workers=0, salt="s")
    output = str(tmp_path / "store")
    contract = prep.settle_contract(output, cfg, cases)
    assert [prep._convert_found(item, output, cfg, contract)[0] for item in handed] == ["ok", "ok"]
    assert dict(reads) == {f: [0, 1] for f in files_under(batch)}


def test_the_reused_headers_read_the_same_volume_and_source_headers(batch, monkeypatch):
    expected = {name: stacked_by_pydicom(batch / name) for name in SERIES}
    fresh = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted((batch / "ct").iterdir())]
    first = {name: read_image(batch / name) for name in SERIES}  # headers read here, reused below
    reads = count_reads(monkeypatch, batch)
    for name in SERIES:
        vol = read_image(batch / name)
        assert np.array_equal(vol.data, first[name].data) and np.array_equal(vol.affine, first[name].affine)
        assert np.array_equal(vol.data, expected[name])
    source = read_source_series(batch / "ct")
    assert dict(reads) == {f: [0, 1] for f in files_under(batch)}
    assert sorted(ds.SOPInstanceUID for ds in source.datasets) == sorted(ds.SOPInstanceUID for ds in fresh)
    assert all(ds.SOPClassUID == fresh[0].file_meta.MediaStorageSOPClassUID for ds in source.datasets)
    assert np.allclose(source.affine, first["ct"].affine)


def test_a_slice_rewritten_since_its_header_was_read_is_read_again(batch):
    read_image(batch / "lung")
    f = batch / "lung" / "1.dcm"
    ds = pydicom.dcmread(f)
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()  # now another series: the folder holds two
    ds.save_as(f)
    with pytest.raises(dicom.SeriesChoiceError, match="folder holds 2 DICOM series"):
        read_image(batch / "lung")
