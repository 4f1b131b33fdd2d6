"""A detached NRRD header reads its data file only from beside itself."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from lnfm.io import ImageReadError, read_image


def _detached(folder, data_file: str, raw_bytes: bytes, shape=(4, 3, 2)) -> str:
    header = folder / "scan.nhdr"
    header.write_text("NRRD0004\ntype: int16\ndimension: 3\nspace: right-anterior-superior\n"
                      f"sizes: {shape[0]} {shape[1]} {shape[2]}\n"
                      "space directions: (1,0,0) (0,1,0) (0,0,2)\nspace origin: (0,0,0)\n"
                      f"endian: little\nencoding: raw\ndata file: {data_file}\n\n")
    return str(header)


def test_data_file_beside_the_header_matches_simpleitk(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)  # C order (z, y, x) = NRRD's fastest-first x
    (tmp_path / "scan.raw").write_bytes(data.tobytes())
    header = _detached(tmp_path, "scan.raw", data.tobytes())
    vol = read_image(header)
    np.testing.assert_array_equal(vol.data, np.transpose(sitk.GetArrayFromImage(sitk.ReadImage(header)), (2, 1, 0)))
    assert vol.affine[2, 2] == 2.0


@pytest.mark.parametrize("where", ["absolute", "parent", "sub_link"])
def test_data_file_elsewhere_is_refused(tmp_path, where):
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"\x01\x02" * 24)
    folder = tmp_path / "scan"
    folder.mkdir()
    if where == "absolute":
        name = str(outside)
    elif where == "parent":
        name = "../secret.bin"
    else:  # a link beside the header that points outside is outside too
        (folder / "link.raw").symlink_to(outside)
        name = "link.raw"
    header = _detached(folder, name, b"")
    with pytest.raises(ImageReadError) as err:
        read_image(header)
    assert str(err.value) == f"{header}: NRRD 'data file' must lie beside the header, not at '{name}'"


def test_a_list_of_data_files_is_refused(tmp_path):
    header = _detached(tmp_path, "LIST", b"")
    with pytest.raises(ImageReadError, match="lists several files"):
        read_image(header)
