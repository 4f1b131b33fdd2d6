"""Store: URL -> kvstore mapping, sharded zarr3 arrays, manifest merging."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from lnfm.data import store as st


def test_kvstore_spec_maps_paths_and_urls(tmp_path):
    assert st.kvstore_spec("gs://bucket/data/ln", "cases/a") == {"driver": "gcs", "bucket": "bucket",
                                                                 "path": "data/ln/cases/a"}
    assert st.kvstore_spec("s3://b/x/") == {"driver": "s3", "bucket": "b", "path": "x"}
    assert st.kvstore_spec(f"file://{tmp_path}", "m") == {"driver": "file", "path": f"{tmp_path}/m"}
    assert st.kvstore_spec(str(tmp_path)) == {"driver": "file", "path": str(tmp_path)}
    with pytest.raises(ValueError, match="unsupported store URL scheme 'ftp'"):
        st.kvstore_spec("ftp://host/x")


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_sharded_array_round_trip_and_partial_reads(tmp_path, dtype):
    data = (np.random.default_rng(0).normal(size=(70, 40, 130)) * 100).astype(dtype)
    st.create_array(str(tmp_path), "cases/a/x", data, chunk=32, shard=64)
    arr = st.open_array(f"file://{tmp_path}", "cases/a/x")
    assert arr.shape == data.shape and arr.dtype.name == np.dtype(dtype).name
    np.testing.assert_array_equal(arr[5:50, 3:9, 60:129].read().result(), data[5:50, 3:9, 60:129])
    # 3 x 1 x 3 shards of 64^3 hold the 70 x 40 x 130 array.
    assert len(list((tmp_path / "cases/a/x/c").rglob("*"))) - len(
        [p for p in (tmp_path / "cases/a/x/c").rglob("*") if p.is_dir()]) == 6
    with pytest.raises(ValueError, match="multiple of chunk"):
        st.create_array(str(tmp_path), "y", data, chunk=48, shard=64)


def test_manifest_merges_records_until_rewritten(tmp_path):
    s = str(tmp_path)
    st.write_record(s, {"case_id": "b", "v": 1})
    st.write_record(s, {"case_id": "a", "v": 2})
    assert [r["case_id"] for r in st.read_manifest(s)] == ["a", "b"]
    st.write_manifest(s)
    assert [json.loads(x)["case_id"] for x in (tmp_path / "manifest.jsonl").read_text().splitlines()] == ["a", "b"]
    st.write_record(s, {"case_id": "c", "v": 3})  # another host finished a case meanwhile
    assert [r["case_id"] for r in st.read_manifest(s)] == ["a", "b", "c"]
    assert st.read_manifest(str(tmp_path / "empty")) == []


def test_a_store_named_with_dot_dot_opens(tmp_path, monkeypatch):
    """`--data ../store` was refused: TensorStore takes no '..' in a file path. The path is resolved first."""
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    st.create_array(str(tmp_path / "store"), "cases/a/x", data, chunk=32, shard=64)
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert st.kvstore_spec("../store", "m") == {"driver": "file", "path": f"{tmp_path}/store/m"}
    np.testing.assert_array_equal(st.read_array(st.open_array("../store", "cases/a/x")), data)


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32])
def test_every_chunk_is_written_and_a_missing_chunk_file_is_refused(tmp_path, dtype):
    """TensorStore left out a chunk equal to the fill value (0), so a chunk file deleted, or left out of a copy of
    the store, read as zeros with no word. Every chunk is written now (the values read are the same), and an array
    opened with `every_chunk` refuses a missing one in one line naming the store, the case and what to do."""
    data = np.zeros((70, 40, 130), dtype)
    data[64:, :, 100:] = 7  # one of the 3 x 1 x 3 shards holds more than zeros
    st.create_array(str(tmp_path), "cases/a/x", data, chunk=32, shard=64)
    shards = sorted(p for p in (tmp_path / "cases/a/x/c").rglob("*") if p.is_file())
    assert len(shards) == 6
    np.testing.assert_array_equal(st.read_array(st.open_array(str(tmp_path), "cases/a/x", every_chunk=True)), data)
    shards[0].unlink()
    said = (rf"^{tmp_path}: case a: a stored array cannot be read \(NOT_FOUND: cases/a/x misses a file: a store "
            rf"copied in part, or a file deleted\); copy the store again, or remove records/a.json and the folder "
            rf"cases/a, then rerun prepare to convert the case again$")
    with pytest.raises(st.StoreError, match=said):
        st.read_array(st.open_array(str(tmp_path), "cases/a/x", every_chunk=True))
    with pytest.raises(st.StoreError, match=said):  # a box touching only that file
        st.read_array(st.open_array(str(tmp_path), "cases/a/x", every_chunk=True)[:2, :2, :2])
    np.testing.assert_array_equal(  # a box the file holds no part of reads as ever
        st.read_array(st.open_array(str(tmp_path), "cases/a/x", every_chunk=True)[64:, :, 64:]), data[64:, :, 64:])
    # Opened as a case prepared before every chunk was written: the missing file reads as zeros, as zarr defines.
    np.testing.assert_array_equal(st.read_array(st.open_array(str(tmp_path), "cases/a/x")), data)


def test_a_missing_array_folder_is_one_line(tmp_path):
    """A case's array gone altogether (zarr.json too) was a TensorStore traceback when opened."""
    st.create_array(str(tmp_path), "cases/a/label", np.ones((4, 4, 4), np.uint8))
    shutil.rmtree(tmp_path / "cases/a/label")
    with pytest.raises(st.StoreError, match=rf"^{tmp_path}: case a: .*NOT_FOUND: cases/a/label misses a file.*"
                                            rf"copy the store again"):
        st.open_array(str(tmp_path), "cases/a/label")


def test_a_damaged_case_is_named_in_a_store_under_a_folder_called_cases(tmp_path):
    """The store and case were read off the first '/cases/' in TensorStore's message: a store at
    .../cases/store1 was named '...' with case 'store1'. Now they come from the array's own path, split from its
    end."""
    store = tmp_path / "cases" / "store1"
    data = np.ones((70, 40, 130), np.int16)
    st.create_array(str(store), "cases/c1/image_0000", data, chunk=32, shard=64)
    st.create_array(str(store), "cases/c1/label", data.astype(np.uint8), chunk=32, shard=64)
    next(p for p in (store / "cases/c1/image_0000/c").rglob("*") if p.is_file()).unlink()
    with pytest.raises(st.StoreError, match=rf"^{store}: case c1: a stored array cannot be read \(NOT_FOUND: "
                                            rf"cases/c1/image_0000 misses a file.*remove records/c1.json and the "
                                            rf"folder cases/c1, then rerun prepare"):
        st.read_array(st.open_array(str(store), "cases/c1/image_0000", every_chunk=True))
    shutil.rmtree(store / "cases/c1/label")  # the array gone altogether: refused as it is opened
    with pytest.raises(st.StoreError, match=rf"^{store}: case c1: .*NOT_FOUND: cases/c1/label misses a file"):
        st.open_array(str(store), "cases/c1/label")
