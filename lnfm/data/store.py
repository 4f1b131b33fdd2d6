"""The prepared dataset store: zarr3 arrays (TensorStore, sharded, blosc/zstd) plus a
JSON-lines manifest, addressed by a local path or a file://, gs:// or s3:// URL.

Layout under STORE:
  cases/<case_id>/image_<cccc>   zarr3 array per channel (int16 HU for CT, float32 otherwise)
  cases/<case_id>/label          zarr3 uint8 label array (labelled cases only)
                                 every chunk stored: a missing chunk file is refused (`EVERY_CHUNK`)
  records/<case_id>.json         one manifest record, written after the case's arrays
  manifest.jsonl                 all records merged (rewritten after each conversion run)
  failures.parts/<i>.jsonl       failures of shard i's last run; failures.jsonl merges them
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import tensorstore as ts

from lnfm.errors import DataError

log = logging.getLogger("lnfm.data")


class StoreError(DataError):
    """A store that cannot be opened, read or written; one line naming the store."""


CASES = "cases/"
RECORDS = "records/"
MANIFEST = "manifest.jsonl"
FAILURES = "failures.jsonl"
SPACING_RTOL = 0.02  # prepared spacings within 2% count as the configured one
# A record key, true where the case's arrays hold every chunk (`create_array`), so that a chunk file missing from
# the store (a copy cut short, a file deleted) is refused when read. A case without it (prepared before lnfm wrote
# every chunk) may lack chunks equal to the fill value, as zarr allows: there a missing file reads as zeros.
EVERY_CHUNK = "every_chunk_stored"


def kvstore_spec(store: str, sub: str = "") -> dict:
    """Map a path or URL (file://, gs://, s3://) to a TensorStore kvstore spec for `sub` inside it."""
    url = urlparse(str(store))
    if url.scheme in ("gs", "s3"):
        base = url.path.lstrip("/")
        path = "/".join(p for p in (base.rstrip("/"), sub) if p)
        driver = "gcs" if url.scheme == "gs" else "s3"
        return {"driver": driver, "bucket": url.netloc, "path": path}
    if url.scheme == "file":
        local = url.netloc + url.path
    elif url.scheme in ("", ) or (len(url.scheme) == 1 and os.name == "nt"):
        local = str(store)
    else:
        raise StoreError(f"{store}: unsupported store URL scheme '{url.scheme}' (use a path, file://, gs:// or s3://)")
    root = Path(local).resolve()  # TensorStore refuses a path with '..' in it; resolved as the OS reads it
    path = str(root / sub) if sub else str(root)
    return {"driver": "file", "path": path}


def _failure(store: str, what: str, e: Exception) -> StoreError:
    return StoreError(f"{store}: cannot {what} ({str(e).splitlines()[0] if str(e) else type(e).__name__})")


def is_local_store(folder: Path) -> bool:
    """Whether a local folder is a prepared store (a merged manifest or per-case records), found by its own
    files rather than by a path some run recorded."""
    return (folder / MANIFEST).is_file() or (folder / RECORDS).is_dir()


def check_local_store(store: str) -> None:
    """A local store path must be a folder or not exist yet (a file there is not a store)."""
    spec = kvstore_spec(store)
    if spec["driver"] == "file" and Path(spec["path"]).exists() and not Path(spec["path"]).is_dir():
        raise StoreError(f"{store}: exists and is not a folder (a store is a folder)")


def open_kvstore(store: str) -> ts.KvStore:
    spec = kvstore_spec(store)
    spec["path"] = spec["path"].rstrip("/") + "/"
    try:
        return ts.KvStore.open(spec).result()
    except ValueError as e:  # TensorStore reports I/O and spec problems as ValueError
        raise _failure(store, "open the store", e) from None


def read_text(store: str, key: str) -> str | None:
    try:
        res = open_kvstore(store).read(key).result()
    except ValueError as e:
        raise _failure(store, f"read {key}", e) from None
    return None if res.state == "missing" else bytes(res.value).decode()


def write_text(store: str, key: str, text: str) -> None:
    """One kvstore write: atomic per key on every driver (file driver: temp + rename)."""
    try:
        open_kvstore(store).write(key, text.encode()).result()
    except ValueError as e:  # e.g. a full disk or a read-only folder
        raise _failure(store, f"write {key}", e) from None


def array_spec(store: str, path: str) -> dict:
    return {"driver": "zarr3", "kvstore": kvstore_spec(store, path)}


def create_array(store: str, path: str, data: np.ndarray, chunk: int = 64, shard: int = 128) -> None:
    """Write `data` as a new zarr3 array (replacing any partial one from an interrupted run). Every chunk is
    written, one equal to the fill value too (zarr lets a writer leave those out, and TensorStore does by default),
    so that a chunk file missing later can be told from one never written: mark the case's record `EVERY_CHUNK`."""
    if shard % chunk:
        raise ValueError(f"shard size {shard} must be a multiple of chunk size {chunk}")
    dtype = np.dtype(data.dtype)
    blosc = {"name": "blosc", "configuration": {"cname": "zstd", "clevel": 3, "shuffle": "shuffle",
                                                  "typesize": dtype.itemsize}}
    spec = array_spec(store, path)
    spec.update(create=True, delete_existing=True, store_data_equal_to_fill_value=True, metadata={
        "shape": list(data.shape),
        "data_type": dtype.name,
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [shard] * data.ndim}},
        "codecs": [{"name": "sharding_indexed", "configuration": {
            "chunk_shape": [chunk] * data.ndim,
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, blosc],
            "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
        }}],
    })
    try:
        arr = ts.open(spec).result()
        arr.write(np.ascontiguousarray(data)).result()
    except ValueError as e:
        if "os_error_code" in str(e):  # a full disk or a read-only folder: the store, not the case, is at fault
            raise _failure(store, f"write {path}", e) from None
        raise


def open_array(store: str, path: str, every_chunk: bool = False) -> ts.TensorStore:
    """Open a stored array for reading; slicing it reads only the chunks touched. With `every_chunk` (an array
    `create_array` wrote) a chunk file missing is an error when read (`read_array`), not the fill value: TensorStore
    checks it as it reads, with no listing and no extra request."""
    spec = array_spec(store, path)
    if every_chunk:
        spec["fill_missing_data_reads"] = False
    try:
        return ts.open(spec, open=True, read=True).result()
    except ValueError as e:  # a case's array folder gone, or its zarr.json
        error = _case_file_error(e, spec["kvstore"])
        if error is None:
            raise
        raise error from None


def open_case_array(store: str, record: dict, path: str) -> ts.TensorStore:
    """`open_array` of one of the case's arrays, a missing chunk file refused where its record says every chunk was
    written (`EVERY_CHUNK`)."""
    return open_array(store, path, bool(record.get(EVERY_CHUNK)))


def write_record(store: str, record: dict) -> None:
    write_text(store, f"{RECORDS}{record['case_id']}.json", json.dumps(record))


def _record_ids(store: str) -> list[str]:
    try:
        keys = open_kvstore(store).list(ts.KvStore.KeyRange(RECORDS, RECORDS[:-1] + "0")).result()
    except ValueError as e:
        raise _failure(store, "list its records", e) from None
    return sorted(k.decode()[len(RECORDS):-len(".json")] for k in keys if k.decode().endswith(".json"))


def _case_folder_ids(store: str) -> set[str]:
    """The ids of the cases with a file under cases/ (an empty folder, as `delete_case` leaves one, holds none)."""
    try:
        keys = open_kvstore(store).list(ts.KvStore.KeyRange(CASES, CASES[:-1] + "0")).result()
    except ValueError as e:
        raise _failure(store, "list its cases", e) from None
    return {key.decode()[len(CASES):].split("/", 1)[0] for key in keys}


def delete_case(store: str, case_id: str) -> None:
    """Remove the arrays under cases/<case_id>/ (a case that failed after some were written)."""
    prefix = f"{CASES}{case_id}/"
    try:
        open_kvstore(store).delete_range(ts.KvStore.KeyRange(prefix, prefix[:-1] + "0")).result()
    except ValueError as e:
        raise _failure(store, f"remove {prefix}", e) from None


def _check_recorded(store: str, ids: list[str]) -> None:
    """Prepare writes a case's arrays, then its record: arrays without a record are a case that a killed prepare
    left half-written (or one still converting). Read past, it was left out of training and evaluation unsaid."""
    unrecorded = sorted(_case_folder_ids(store) - set(ids))
    if unrecorded:
        cid, more = unrecorded[0], f" (and {len(unrecorded) - 1} more)" if len(unrecorded) > 1 else ""
        raise StoreError(f"{store}: case {cid}{more} has arrays under cases/{cid}/ but no records/{cid}.json (a "
                         f"prepare stopped while converting it, or converts it now); rerun prepare over the same "
                         f"input to convert it again, or remove the folder cases/{cid}")


def read_manifest(store: str) -> list[dict]:
    """All case records, sorted by case_id. Uses manifest.jsonl when it lists exactly the
    finished cases, else merges the per-case records (e.g. while shards still convert).
    A case folder without a record is refused (`_check_recorded`); prepare reads records alone."""
    ids = _record_ids(store)
    _check_recorded(store, ids)
    return _records(store, ids)


def read_records(store: str) -> list[dict]:
    """Every finished case's record, as `read_manifest` reads them, a case folder without a record let be (prepare's
    rerun converts it again)."""
    return _records(store, _record_ids(store))


def _records(store: str, ids: list[str]) -> list[dict]:
    merged = read_text(store, MANIFEST)
    if merged is not None:
        rows = [json.loads(line) for line in merged.splitlines() if line.strip()]
        if sorted(r["case_id"] for r in rows) == ids:
            return rows
    return [json.loads(read_text(store, f"{RECORDS}{i}.json") or "{}") for i in ids]


def content_fingerprint(record: dict) -> str:
    """What a case's record tells of its stored content, no array read: the digest of the input files' bytes it was
    prepared from (`source`: images and label), or, in a record from before that digest, a digest of what prepare
    measured on the stored arrays (grid, intensity statistics, label components). A case prepared again under its
    id from other images or labels gets another."""
    if record.get("source"):
        return str(record["source"])
    measured = [record.get(k) for k in ("shape", "affine", "intensity", "nodes", "label_path")]
    return "record:" + hashlib.sha256(json.dumps(measured, sort_keys=True).encode()).hexdigest()[:32]


def finished_ids(store: str) -> set[str]:
    return set(_record_ids(store))


def write_manifest(store: str) -> list[dict]:
    """Rewrite manifest.jsonl from the per-case records (one atomic write)."""
    ids = _record_ids(store)
    rows = [json.loads(read_text(store, f"{RECORDS}{i}.json") or "{}") for i in ids]
    write_text(store, MANIFEST, "".join(json.dumps(r) + "\n" for r in rows))
    return rows


def read_failures(store: str) -> list[dict]:
    text = read_text(store, FAILURES) or ""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


# TensorStore's status for a chunk or shard file that is damaged, truncated or gone (a bug of ours in the box
# asked for would be INVALID_ARGUMENT or OUT_OF_RANGE, and keeps its traceback). "chunk ... is missing": a chunk of
# an array opened with `every_chunk` is in no file.
_UNREADABLE = re.compile(r"^(FAILED_PRECONDITION|DATA_LOSS|NOT_FOUND): (Error (reading|opening)|chunk .* is missing)")


def _case_array(kvstore: dict) -> tuple[str, str, str] | None:
    """(store, case, array) of the array at kvstore spec `kvstore`, STORE/cases/CASE/ARRAY; None for another path.
    Split from the array's end: the store's own path may hold a folder named cases too."""
    head, _, array = kvstore.get("path", "").rstrip("/").rpartition("/")
    head, _, case = head.rpartition("/")
    store, _, folder = head.rpartition("/")
    if folder != "cases" or not case or not array:
        return None
    if kvstore.get("driver") in ("gcs", "s3"):
        store = f"{'gs' if kvstore['driver'] == 'gcs' else 's3'}://{kvstore['bucket']}/{store}".rstrip("/")
    return store, case, array


def _case_file_error(e: ValueError, kvstore: dict) -> StoreError | None:
    """The one-line StoreError for TensorStore's error `e` about a damaged or missing file of the case array at
    kvstore spec `kvstore`, naming the store, the case and what to do; None for any other error."""
    m = _UNREADABLE.match(str(e))
    where = _case_array(kvstore)
    if m is None or where is None:
        return None
    store, case, array = where
    if m.group(1) == "NOT_FOUND":  # a file deleted, or a copy of the store that left files out
        return StoreError(f"{store}: case {case}: a stored array cannot be read (NOT_FOUND: cases/{case}/{array} "
                          f"misses a file: a store copied in part, or a file deleted); copy the store again, or "
                          f"remove records/{case}.json and the folder cases/{case}, then rerun prepare to convert "
                          f"the case again")
    return StoreError(f"{store}: case {case}: a stored array cannot be read ({m.group(1)}: a file under "
                      f"cases/{case}/ is damaged, truncated or missing); remove records/{case}.json and the folder "
                      f"cases/{case}, then rerun prepare to convert the case again")


def read_array(box) -> np.ndarray:
    """`box.read().result()` of a stored array (or a box of one); a damaged or missing file of a case is a one-line
    StoreError naming the store and the case (it was a traceback from inside the training loop)."""
    try:
        return box.read().result()
    except ValueError as e:
        error = _case_file_error(e, box.kvstore.spec().to_json() if box.kvstore is not None else {})
        if error is None:
            raise
        raise error from None


def read_case(store: str, record: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """Whole case: image float32 (X, Y, Z, C) in raw units (HU / SUV), label uint8 (X, Y, Z) or None."""
    chans = [read_array(open_case_array(store, record, p)).astype(np.float32) for p in record["image_path"]]
    image = np.stack(chans, axis=-1)
    label = None
    if record.get("label_path"):
        label = read_array(open_case_array(store, record, record["label_path"])).astype(np.uint8)
    return image, label


def check_stores(stores: list[str], split: str | None = None,
                 spacing: tuple[float, float, float] | None = None) -> list[list[dict]]:
    """Each store's records (`read_manifest`, every split), for the job to use on: a read lists every key under
    cases/, so a job reads each store once. A missing or empty store, or one at another spacing, is a one-line
    DataError."""
    if not stores:
        raise DataError("no dataset given: pass --data STORE[,STORE...]")
    manifests = []
    for store in stores:
        if "://" not in store and not Path(store).is_dir():
            raise DataError(f"{store}: dataset not found (expected a prepared store; see data_prep/prepare.py)")
        try:
            manifests.append(read_manifest(store))
        except DataError:  # one line naming the store already
            raise
        except (OSError, ValueError, KeyError) as e:  # unreadable or malformed manifest
            raise DataError(f"{store}: cannot read the dataset manifest ({str(e).splitlines()[0][:200]})") from None
        if not manifests[-1]:
            raise DataError(f"{store}: dataset is empty (no prepared cases)")
        records = [r for r in manifests[-1] if split is None or r.get("split") == split]
        if not records:
            raise DataError(f"{store}: no cases in split '{split}' (set data.split=null to use every case)")
        if spacing is not None:
            off = [r["case_id"] for r in records
                   if not np.allclose(r.get("spacing", spacing), spacing, rtol=SPACING_RTOL)]
            if off:
                raise DataError(f"{store}: {len(off)} of {len(records)} cases are not at data.spacing={list(spacing)} "
                                f"mm (re-prepare with --spacing, or set data.spacing=null)")
        unchecked = sum(not r.get(EVERY_CHUNK) for r in records)
        if unchecked:  # readable as ever, but a chunk file lost from them is not noticed
            log.warning("%s: %d of %d cases were prepared before lnfm stored every chunk: a chunk file missing from "
                        "them (a store copied in part) reads as zeros without a word; prepare into a new store to "
                        "have such a file refused", store, unchecked, len(records))
    return manifests
