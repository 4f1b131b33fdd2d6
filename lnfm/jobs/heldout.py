"""Score a model, LNFM's or a peer's, on held-out raw scans exactly as `lnfm predict` would.

Shared by `bench/accuracy.py` and `lnfm demo`, so a benchmark table and the demo's
side-by-side line come from one evaluation: each raw scan goes through the export's
recorded preprocessing, sliding window and post-processing (`predict_volume`), and
the mask is scored on the scan's own grid against its reference mask.

A peer (`lnfm.segmentation.peers`: a MONAI network a user would train instead) trains
on the patches of LNFM's own loader (same store, labelled cases, patch, batch,
foreground share and seed) and is plugged into the same pipeline through its
probability function. The peers need the `dev` extra (torch and MONAI).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from lnfm.data.benchmark import TestCase
from lnfm.data.geometry import spacing_of
from lnfm.data.loader import LoaderConfig, make_loader
from lnfm.errors import LnfmError
from lnfm.eval.metrics import EvalConfig, evaluate_case
from lnfm.data.store import read_manifest
from lnfm.eval.postprocess import tune_size_prior, without_size_prior
from lnfm.io import read_image
from lnfm.jobs.export_meta import ExportMeta
from lnfm.jobs.predict import PredictOptions, predict_volume, read_scan

try:
    from lnfm.segmentation import peers
except ImportError:  # torch and MONAI are the dev extra: only the peers need them
    peers = None

EVAL = EvalConfig(min_overlap=0.5)  # node sensitivity at IoU >= 0.5


def evaluate(fn: Callable[[np.ndarray], np.ndarray], meta: ExportMeta, test: Sequence[TestCase],
             overlap: float) -> tuple[list[dict], float]:
    """Per-case metrics of `fn` (patches -> probabilities) on the raw held-out scans, and the
    inference seconds per volume (after one warm-up call, which compiles)."""

    fn(np.zeros((int(meta.inference.sw_batch_size), *meta.preprocessing.patch_size, len(meta.channels)), np.float32))
    cases, seconds = [], 0.0
    for case in test:
        vol = read_scan([str(case.image)], meta)
        t0 = time.perf_counter()
        pred = predict_volume(fn, meta, vol, PredictOptions(overlap=overlap))
        seconds += time.perf_counter() - t0
        ref = read_image(str(case.label))
        if ref.data.shape[:3] != pred.labels.shape or not np.allclose(ref.affine, pred.affine, atol=1e-3):
            raise LnfmError(f"{case.label}: the prediction is not on the reference mask's grid")
        metrics = evaluate_case(pred.labels > 0, np.asarray(ref.data) > 0, spacing_of(ref.affine), **EVAL.kwargs())
        cases.append({"case_id": case.case_id, **metrics})
    return cases, seconds / max(len(test), 1)


def tune_for(fn: Callable[[np.ndarray], np.ndarray], meta: ExportMeta, val: Sequence[TestCase],
             overlap: float) -> ExportMeta:
    """`meta` with the node size prior re-tuned for `fn` on the raw validation scans `val`, as
    finetuning tunes LNFM's own (`tune_size_prior`, validation only); unchanged without `val`."""
    if not val:
        return meta
    untuned = dataclasses.replace(meta, postprocess=without_size_prior(meta.postprocess))
    masks, truths, spacings = [], [], []
    for case in val:
        pred = predict_volume(fn, untuned, read_scan([str(case.image)], untuned), PredictOptions(overlap=overlap))
        ref = read_image(str(case.label))
        masks.append(pred.labels > 0)
        truths.append(np.asarray(ref.data) > 0)
        spacings.append(spacing_of(ref.affine))
    short, elong, _ = tune_size_prior(masks, truths, spacings)
    return dataclasses.replace(untuned, postprocess=dataclasses.replace(untuned.postprocess, min_short_axis_mm=short,
                                                                        max_elongation=elong))


def paste_hosts(store: str | Path, train_ids: Sequence[str] = ()) -> list[tuple[str, dict]]:
    """The training-split scans of `store` as node-paste hosts (store, record) for a peer, leaving out
    the labelled training cases `train_ids` (by case id: the benchmark and the demo give a scan the
    same id in every store; `finetune --paste-into` matches by content)."""
    labelled = set(train_ids)
    return [(str(store), r) for r in read_manifest(str(store))
            if r["split"] == "train" and r["case_id"] not in labelled]


def train_peer_model(name: str, *, meta: ExportMeta, store: str | Path, train_ids: Sequence[str],
                     loader: LoaderConfig, overlap: float, seed: int, steps: int | None = None,
                     seconds: float | None = None, val: Sequence[TestCase] = (),
                     paste_into: Sequence[tuple[str, dict]] = ()
                     ) -> tuple[Callable[[np.ndarray], np.ndarray], ExportMeta, dict]:
    """Train peer `name` on LNFM's loader for `steps` or `seconds`; returns its probability
    function, the metadata to predict with, and the training record.

    `meta` is the LNFM export the peer is compared with: its contract (channels, spacing,
    normalisation, window size) and post-processing are the peer's too, except the node size
    prior, which is tuned for the peer on the validation scans `val` as LNFM's was on its own
    (and switched off without them). `paste_into`: host scans (store, record) the loader pastes the
    labelled nodes into, as `finetune --paste-into` does for LNFM."""

    if peers is None:
        raise LnfmError("the peers need torch and MONAI: pip install 'lnfm[dev]'")
    patch = tuple(meta.preprocessing.patch_size)
    cfg = dataclasses.replace(loader, patch_size=patch, hu_window=tuple(meta.preprocessing.normalization.hu_window),
                              seed=seed)
    batches = iter(make_loader([str(store)], cfg, split="train", labels=True, case_ids=list(train_ids),
                               shard_index=0, shard_count=1, paste_into=list(paste_into)))
    peer = peers.build_peer(name, len(meta.channels), int(meta.num_classes),
                            tuple(meta.preprocessing.contract.spacing), patch, seed)
    trained = peers.train_peer(peer, batches, peers.Budget(steps=steps, seconds=seconds))
    fn = peers.probability_fn(peer)
    record = {"train_ids": list(train_ids), "train_time_s": trained["train_time_s"], "steps": trained["steps"],
              "params": int(sum(p.numel() for p in peer.net.parameters()))}
    return fn, tune_for(fn, meta, val, overlap), record


def train_and_score_peer(name: str, *, meta: ExportMeta, store: str | Path, train_ids: Sequence[str],
                         loader: LoaderConfig, test: Sequence[TestCase], overlap: float, seed: int,
                         steps: int | None = None, seconds: float | None = None,
                         val: Sequence[TestCase] = (), paste_into: Sequence[tuple[str, dict]] = ()) -> dict:
    """`train_peer_model`, then the peer scored on `test` with `evaluate`."""
    fn, tuned, record = train_peer_model(name, meta=meta, store=store, train_ids=train_ids, loader=loader,
                                         overlap=overlap, seed=seed, steps=steps, seconds=seconds, val=val,
                                         paste_into=paste_into)
    cases, infer = evaluate(fn, tuned, test, overlap)
    return {**record, "infer_s_per_volume": infer, "cases": cases}
