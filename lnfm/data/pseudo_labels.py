"""A store of pseudo-labelled cases: unlabelled scans plus the masks a teacher model predicted.

Self-training (`lnfm finetune --unlabelled`) writes one into the run folder: each case
keeps its stored image (copied, so the store stands alone and the source is only read)
and its source record, with the predicted mask as its label, split "train",
`pseudo_label: true` and the id `pseudo-<n>-<id>`, n being the source's position among the
sources (apart from every labelled store's ids, and from a namesake in another source).
A case whose prediction is empty is left out: it would teach
"no node here" from a scan that was never checked. The manifest is written last, so
`is_complete` tells a finished store from one a kill interrupted (which is rewritten).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from lnfm.data import store as st
from lnfm.data.contract import require_contract, write_contract
from lnfm.data.prepare import lymph_nodes
from lnfm.workdir import check_job_folder

DONE = "pseudo_labels.done"  # written after the manifest: the store is complete
ID_PREFIX = "pseudo-"


def scan_fingerprint(record: dict) -> str:
    """What identifies a prepared scan whatever its case id (two datasets may both name a case
    `pelvis_000`): its source geometry and its stored intensity statistics."""
    return json.dumps([record.get(k) for k in ("source_shape", "source_affine", "shape", "intensity")])


def is_complete(store: str) -> bool:
    return Path(store).is_dir() and st.read_text(store, DONE) is not None


def write_pseudo_store(out: str, cases: Sequence[tuple[str, dict]],
                       predict: Callable[[dict, np.ndarray], np.ndarray], write: bool = True) -> list[str]:
    """Pseudo-label the (source store, record) `cases` into the new store `out`; the sources share
    one contract. `predict(record, image)` returns the label map (X, Y, Z) of one stored image
    (float32 (X, Y, Z, C) in raw units, as `read_case` gives it). Returns the ids of the cases
    kept. With `write` False (the other hosts of a multi-host job, whose devices the predictions
    also need) nothing is written."""
    kept = []
    if write and cases:  # prepared as the sources were: a training store like any other
        check_job_folder(out, "pseudo-labels")  # before each write: TensorStore would remake a moved workdir
        write_contract(out, require_contract(cases[0][0]))
    sources = list(dict.fromkeys(source for source, _ in cases))
    for source, rec in cases:
        # one read per channel, in the stored dtype (int16 CT) for the copy; `read_case`'s float32 for the model
        stored = [st.read_array(st.open_case_array(source, rec, path)) for path in rec["image_path"]]
        image = np.stack([c.astype(np.float32) for c in stored], axis=-1)
        label = np.asarray(predict(rec, image), np.uint8)
        if label.shape != image.shape[:3]:
            raise ValueError(f"case {rec['case_id']}: predicted mask {label.shape} is not on the image grid "
                             f"{image.shape[:3]}")
        if not label.any():
            continue
        cid = f"{ID_PREFIX}{sources.index(source)}-{rec['case_id']}"
        kept.append(cid)
        if not write:
            continue
        check_job_folder(out, "pseudo-labels")
        base = f"cases/{cid}"
        paths = [f"{base}/image_{c:04d}" for c in range(len(stored))]
        for path, chan in zip(paths, stored):
            st.create_array(out, path, chan)
        st.create_array(out, f"{base}/label", label)
        st.write_record(out, {**rec, "case_id": cid, "split": "train", "image_path": paths,
                              "label_path": f"{base}/label", "labelled": True, "pseudo_label": True,
                              "nodes": lymph_nodes(label, rec["spacing"]), st.EVERY_CHUNK: True})
    if write:
        check_job_folder(out, "pseudo-labels")
        st.write_manifest(out)
        st.write_text(out, DONE, f"{len(kept)}\n")
    return kept
