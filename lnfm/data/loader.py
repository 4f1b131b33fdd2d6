"""Grain patch loader over TensorStore datasets.

Every training example is a pure function of (seed, global record index): a grain
IndexSampler hands out indices (sharded per process, shuffled, endless or for
`num_epochs`), and a RandomMap draws the store (by mixing weight), the case, the patch
centre (a lymph node for `fg_fraction` of labelled patches) and the augmentation from the
record's own generator, then reads only the chunks the patch touches. So the iterator
state (a small JSON blob) is all a resumed job needs to see the same batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import grain
import numpy as np
from scipy import ndimage

from lnfm.config import ConfigError, check_in
from lnfm.data import store as st
from lnfm.data.contract import hu_window_problem, normalize
from lnfm.data.augment import blur, context_size, flip_rot90, intensity_jitter, low_resolution, noise, rotate_scale
from lnfm.data.paste import augment_donor, paste_node, paste_site
from lnfm.errors import DataError


@dataclass
class LoaderConfig:
    """Random 3D patches from prepared stores."""

    patch_size: tuple[int, int, int] = (96, 96, 96)  # patch edge in voxels (X, Y, Z)
    batch_size: int = 2  # patches per batch, per process
    hu_window: tuple[float, float] = (-1000.0, 1000.0)  # CT HU mapped linearly to [0, 1] (clipped)
    pet_scale: float = 10.0  # non-CT channels (PET SUV) are divided by this
    fg_fraction: float = 0.33  # share of labelled patches centred on a lymph node
    # A look-alike: a voxel at least 2 voxels outside every node whose CT value lies within the case's node
    # voxels' 10th-90th percentile (muscle, vessels, bowel wall: where false positives come from).
    hard_negative_fraction: float = 0.0  # share of the other labelled patches centred on a node look-alike
    workers: int = 0  # grain worker processes (0 reads in this process)
    prefetch: int = 2  # batches buffered per worker
    flips: bool = True  # random flip of each axis
    rot90: bool = True  # random in-plane 90-degree turns (square in-plane patches only)
    intensity_scale: float = 0.1  # multiply normalised intensities by 1 + U(-s, s)
    intensity_shift: float = 0.1  # add U(-s, s) to normalised intensities
    rotate_deg: float = 0.0  # random in-plane rotation up to this many degrees (0 = off)
    scale: float = 0.0  # random zoom by up to this fraction (0 = off)
    tilt_deg: float = 0.0  # random out-of-plane tilt about both in-plane axes up to this many degrees (0 = off)
    spatial_p: float = 0.2  # share of patches rotated, tilted and zoomed when those are on (nnU-Net: 0.2)
    low_res: float = 1.0  # simulate a scan up to this many times coarser per axis, half the patches (1 = off)
    blur_sigma: float = 0.0  # Gaussian blur up to this sigma (voxels), a fifth of the patches (0 = off)
    noise_std: float = 0.0  # Gaussian noise up to this std (normalised units), 30% of the patches (0 = off)
    # Node paste (lnfm/data/paste.py), on when the loader is given host scans: this share of the patches is
    # a host scan's patch with a labelled node pasted into its fat, scored within paste_margin voxels of it.
    paste_p: float = 0.5  # dev phantoms: 0.5 against 0.3, +0.008 in-domain and +0.013 held-out (docs/finetuning.md)
    paste_margin: int = 6  # voxels of the host around a pasted node that are scored as background
    paste_flip: bool = False  # flip each pasted node on each axis at random (dev phantoms: no measurable change)
    paste_zoom: float = 0.0  # zoom each pasted node by a factor in [1/(1+z), 1+z] (0.25: -0.049 held-out Dice)
    seed: int = 0  # sampling seed (pretraining; finetuning uses train.seed + repeat, only 0)
    epoch_length: int = 10000  # records per epoch of the virtual index the sampler shuffles


# The settings `PatchSampler` reads only for labelled patches (`labels=True`): node-centred and look-alike
# patches, node paste. A job that draws unlabelled patches (pretraining) never reads them.
PASTE_KEYS = ("paste_p", "paste_margin", "paste_flip", "paste_zoom")  # read only when given host scans (--paste-into)
LABEL_ONLY_KEYS = ("fg_fraction", "hard_negative_fraction", *PASTE_KEYS)


def check_loader(cfg: LoaderConfig, where: str = "loader") -> None:
    """The loader section's ranges (`where`: its name in the job's config, `loader` or `data`), the one
    place they are checked; jobs call it before anything is written. Each refusal names the key and
    its valid range. The patch and batch sizes are the jobs' own (site.patch, train.global_batch)."""
    for name in ("fg_fraction", "hard_negative_fraction", "spatial_p", "paste_p"):  # shares of the patches
        check_in(where, cfg, name, lambda v: 0.0 <= v <= 1.0, "[0, 1]", " (a share of the patches)")
    for name in ("intensity_shift", "rotate_deg", "scale", "tilt_deg", "blur_sigma", "noise_std", "paste_zoom"):
        check_in(where, cfg, name, lambda v: v >= 0, "[0, inf)", " (0 = off)")  # drawn as U(-v, v) or up to v
    check_in(where, cfg, "intensity_scale", lambda v: 0.0 <= v < 1.0, "[0, 1)", " (0 = off)")  # 1 + U(-s, s) > 0
    check_in(where, cfg, "low_res", lambda v: v >= 1.0, "[1, inf)", " (times coarser; 1 = off)")
    check_in(where, cfg, "pet_scale", lambda v: v > 0, "(0, inf)", " (the PET divisor)")
    problem = hu_window_problem(cfg.hu_window, f"{where}.hu_window")
    if problem:
        raise ConfigError(problem)
    for name, low in (("paste_margin", 0), ("workers", 0), ("prefetch", 1), ("seed", 0), ("epoch_length", 1)):
        if getattr(cfg, name) < low:  # integers
            raise ConfigError(f"{where}.{name} must be in [{low}, inf), got {getattr(cfg, name)}")
    if cfg.seed >= 2 ** 32:
        raise ConfigError(f"{where}.seed must be in [0, 2**32), got {cfg.seed}")


def unread_keys(patch, where: str, patch_key: str) -> dict[str, str]:
    """The loader keys a job with this patch never reads -> why (`lnfm.config.refuse_unread`): a 90-degree turn
    would change a patch whose in-plane sides differ, so `flip_rot90` turns only square ones."""
    if patch[0] == patch[1]:
        return {}
    return {f"{where}.rot90": f"read only for a patch with equal in-plane sides, and {patch_key} is {list(patch)}"}


def check_weights(weights: list[float], stores: int, where: str = "weights") -> None:
    """One finite, non-negative mixing weight per store, not all zero (a NaN reached the sampler's draw)."""
    if len(weights) != stores:
        raise ConfigError(f"{where} has {len(weights)} values for {stores} datasets")
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"{where} {list(weights)} must be finite non-negative numbers, one per store, not all zero")


def read_box(arr, start: np.ndarray, size: tuple[int, int, int], fill: float = 0.0, dtype=np.float32,
             edge: bool = False) -> np.ndarray:
    """arr[start:start+size], reading only that box. Voxels outside the volume are `fill`, or with
    `edge` repeat the nearest voxel inside it (`fill` then only for a box that misses the volume)."""
    shape = np.asarray(arr.shape[:3])
    start = np.asarray(start)
    lo = np.maximum(start, 0)
    hi = np.minimum(start + np.asarray(size), shape)
    if not np.all(hi > lo):
        return np.full(size, fill, dtype=dtype)
    box = np.asarray(st.read_array(arr[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]), dtype=dtype)
    pad = [(int(x), int(n - y)) for x, y, n in zip(lo - start, hi - start, size)]
    if not any(a or b for a, b in pad):  # inside the volume: every patch of a large enough scan
        return box
    return np.pad(box, pad, mode="edge") if edge else np.pad(box, pad, constant_values=fill)


def patch_start(centre: np.ndarray, shape: np.ndarray, size: np.ndarray) -> np.ndarray:
    """Box start around `centre`, moved inside the volume where the volume is large enough
    (the centre stays inside the box); a volume smaller than the box sits inside it."""
    start = centre - size // 2
    return np.clip(start, np.minimum(0, shape - size), np.maximum(0, shape - size))


class IndexSource(grain.sources.RandomAccessDataSource):
    """Record i is just i: the patch is drawn from the record's generator in `PatchSampler`."""

    def __init__(self, n: int):
        self.n = int(n)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return int(i)

    def __repr__(self) -> str:
        return f"IndexSource(n={self.n})"


class PatchSampler(grain.transforms.RandomMap):
    """(record index, rng) -> {"image": (X, Y, Z, C) float32[, "label": (X, Y, Z) int32]}."""

    def __init__(self, stores: list[str], cases: list[list[dict]], weights: list[float], cfg: LoaderConfig,
                 labels: bool, hosts: list[tuple[str, dict]] = ()):
        self.stores, self.cases, self.cfg, self.labels = stores, cases, cfg, labels
        w = np.asarray(weights, float)
        self.weights = w / w.sum()
        self.hosts = list(hosts) if labels else []  # (store, record) of unlabelled scans to paste nodes into
        self.donors = [(s, r) for s, recs in enumerate(cases) for r in recs if r.get("nodes")]
        self._arrays: dict = {}
        self._lookalikes: dict = {}

    def __getstate__(self):  # TensorStore handles are reopened in each worker process
        state = dict(self.__dict__)
        state["_arrays"], state["_lookalikes"] = {}, {}
        return state

    def _lookalike_voxels(self, store: str, rec: dict) -> np.ndarray:
        """Flat indices of the case's node look-alikes (`LoaderConfig.hard_negative_fraction`), at most
        20000 of them, the same ones in every process (computed once per case and kept)."""
        key = (store, rec["case_id"])
        if key not in self._lookalikes:
            found = np.zeros(0, np.int64)
            channels = [c.upper() for c in rec["channels"]]
            if "CT" in channels:
                shape = tuple(int(n) for n in rec["shape"][:3])
                origin = np.zeros(3, int)
                ct = read_box(self._array(store, rec, rec["image_path"][channels.index("CT")]), origin, shape)
                nodes = read_box(self._array(store, rec, rec["label_path"]), origin, shape, dtype=np.uint8) > 0
                if nodes.any():
                    lo, hi = np.percentile(ct[nodes], [10, 90])
                    near = ndimage.binary_dilation(nodes, iterations=2)
                    found = np.flatnonzero((ct >= lo) & (ct <= hi) & ~near)
                    if found.size > 20000:
                        found = np.sort(np.random.default_rng(0).choice(found, 20000, replace=False))
            self._lookalikes[key] = found
        return self._lookalikes[key]

    def _array(self, store: str, rec: dict, path: str):
        """One of the case's arrays, opened once per process (a missing chunk file refused, `st.open_case_array`)."""
        key = (store, path)
        if key not in self._arrays:
            self._arrays[key] = st.open_case_array(store, rec, path)
        return self._arrays[key]

    def _read(self, store: str, rec: dict, start: np.ndarray, size: tuple[int, int, int]) -> np.ndarray:
        """Raw (X, Y, Z, C) intensities of a box. Outside the volume each voxel repeats the nearest one
        inside, as predict pads a volume thinner than its window (`sliding_window_inference`'s "edge"):
        one rule for out-of-volume voxels in training and serving."""
        chans = [read_box(self._array(store, rec, path), start, size, edge=True) for path in rec["image_path"]]
        return np.stack(chans, axis=-1)

    def _pasted(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
        """A host patch with a labelled node pasted into its fat (raw image, label, channels); None
        when the donor has no CT channel or no fatty site was found."""
        s, rec = self.donors[int(rng.integers(len(self.donors)))]
        if "CT" not in [c.upper() for c in rec["channels"]]:
            return None
        size = np.asarray(self.cfg.patch_size)
        lo, hi = (np.asarray(b) for b in rec["nodes"][int(rng.integers(len(rec["nodes"])))]["bbox"])
        extent = np.minimum(hi - lo + 2, size)  # the node and a voxel around it, at most a patch
        start = (lo + hi) // 2 - extent // 2
        donor = self._read(self.stores[s], rec, start, tuple(extent))
        donor_label = read_box(self._array(self.stores[s], rec, rec["label_path"]), start, tuple(extent),
                               dtype=np.uint8, edge=True)
        if self.cfg.paste_flip or self.cfg.paste_zoom > 0:
            donor, donor_label = augment_donor(donor, donor_label, rng, self.cfg.paste_flip, self.cfg.paste_zoom, size)
            if not donor_label.any():
                return None
        for _ in range(4):  # host patches tried before giving up
            hstore, host = self.hosts[int(rng.integers(len(self.hosts)))]
            if list(host["channels"]) != list(rec["channels"]):
                return None
            shape = np.asarray(host["shape"][:3])
            hstart = patch_start(rng.integers(0, shape), shape, size)
            image = self._read(hstore, host, hstart, tuple(size))
            ct = [c.upper() for c in host["channels"]].index("CT")
            at = paste_site(image[..., ct], donor_label > 0, rng)
            if at is not None:
                image, label = paste_node(image, donor, donor_label.astype(np.int32), at, self.cfg.paste_margin)
                return image, label, list(rec["channels"])
        return None

    def random_map(self, element, rng: np.random.Generator) -> dict:
        cfg = self.cfg
        pasted = self._pasted(rng) if self.hosts and self.donors and rng.random() < cfg.paste_p else None
        resample = False
        if pasted is not None:
            raw, label, channels = pasted
        else:
            s = int(rng.choice(len(self.stores), p=self.weights))
            rec = self.cases[s][int(rng.integers(len(self.cases[s])))]
            shape = np.asarray(rec["shape"][:3])
            size = np.asarray(cfg.patch_size)
            nodes = rec.get("nodes") or []
            if self.labels and nodes and rng.random() < cfg.fg_fraction:
                lo, hi = (np.asarray(b) for b in nodes[int(rng.integers(len(nodes)))]["bbox"])
                centre = rng.integers(lo, hi)
            elif (self.labels and nodes and cfg.hard_negative_fraction > 0 and rng.random() < cfg.hard_negative_fraction
                  and (alike := self._lookalike_voxels(self.stores[s], rec)).size):
                centre = np.asarray(np.unravel_index(alike[int(rng.integers(alike.size))], tuple(shape)))
            else:
                centre = rng.integers(0, shape) if np.all(shape > 0) else np.zeros(3, int)
            start = patch_start(centre, shape, size)
            ctx = np.asarray(context_size(tuple(cfg.patch_size), cfg.rotate_deg, cfg.scale, cfg.tilt_deg))
            resample = tuple(ctx) != tuple(cfg.patch_size) and rng.random() < cfg.spatial_p
            ctx = ctx if resample else size  # a patch read as stored needs no context around it
            ctx_start = start + size // 2 - ctx // 2
            raw, channels = self._read(self.stores[s], rec, ctx_start, tuple(ctx)), rec["channels"]
            label = read_box(self._array(self.stores[s], rec, rec["label_path"]), ctx_start, tuple(ctx),
                             dtype=np.uint8, edge=True) if self.labels else None
        image = normalize(raw, cfg, channels)
        if resample:
            image, label = rotate_scale(image, label, tuple(cfg.patch_size), cfg.rotate_deg, cfg.scale, rng,
                                        cfg.tilt_deg)
        image, label = flip_rot90(image, label, rng, cfg.flips, cfg.rot90)
        image = low_resolution(image, rng, cfg.low_res)
        image = blur(image, rng, cfg.blur_sigma)
        image = noise(image, rng, cfg.noise_std)
        image = intensity_jitter(image, rng, cfg.intensity_scale, cfg.intensity_shift)
        out = {"image": np.ascontiguousarray(image, np.float32)}
        if self.labels:
            out["label"] = np.ascontiguousarray(label, np.int32)
        return out


class GlobalBatchSampler:
    """Host k's t-th batch of b = slice k of global batch t (b * shard_count records, in order).

    The DataLoader hands host k (of P) with W workers the indices x = k + P*(w + W*m), worker w
    batching consecutive m; this maps each x to the global index whose position in the
    global batch sequence matches. Batches therefore do not depend on the process or worker
    count: P hosts together see exactly what one process with the whole batch sees.
    """

    def __init__(self, inner: grain.samplers.IndexSampler, batch_size: int, shard_count: int, worker_count: int):
        self.inner, self.b, self.p, self.w = inner, int(batch_size), int(shard_count), max(1, int(worker_count))
        block = self.b * self.p * self.w
        self.length = len(inner) // block * block  # whole blocks only: the map is a bijection on each block

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, x: int):
        if not 0 <= x < self.length:
            raise IndexError(f"index {x} is outside 0..{self.length - 1}")
        r, k = divmod(x, self.p)
        m, w = divmod(r, self.w)
        n, i = divmod(m, self.b)
        return self.inner[(n * self.w + w) * self.p * self.b + k * self.b + i]

    def __repr__(self) -> str:
        return f"GlobalBatchSampler({self.inner!r}, batch_size={self.b}, shard_count={self.p}, workers={self.w})"


def _select(records: list[dict], split: str | None, labels: bool, case_ids: list[str] | None) -> list[dict]:
    keep = set(case_ids) if case_ids is not None else None
    return [r for r in records
            if (split is None or r.get("split") == split) and (not labels or r.get("label_path"))
            and (keep is None or r["case_id"] in keep)]


def make_loader(stores: list[str], cfg: LoaderConfig, *, split: str | None = "train", labels: bool = False,
                weights: list[float] | None = None, case_ids: list[str] | None = None,
                num_epochs: int | None = None, shard_index: int | None = None,
                shard_count: int | None = None, paste_into: list[tuple[str, dict]] = (),
                manifests: list[list[dict]] | None = None) -> grain.DataLoader:
    """Batches {"image": float32 (B, X, Y, Z, C)[, "label": int32 (B, X, Y, Z)]} of random patches.

    `weights` mix the stores (default: in proportion to their selected cases). Shards default
    to jax.process_index()/process_count(), so each host of a job reads its own records.
    Save `iter(loader).get_state()` (JSON bytes) and `set_state` it to resume exactly.
    `paste_into`: (store, record) of unlabelled scans that labelled nodes are pasted into
    (`cfg.paste_p` of the patches; labels then carry IGNORE_LABEL where the loss must not look).
    `manifests`: each store's records as the job's checks read them (`check_stores`); None reads them.
    """
    if isinstance(stores, str):
        stores = [stores]
    if shard_index is None or shard_count is None:
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    if manifests is None:
        manifests = [st.read_manifest(s) for s in stores]
    cases = [_select(m, split, labels, case_ids) for m in manifests]
    for s, c in zip(stores, cases):
        if not c:
            raise DataError(f"{s}: no {'labelled ' if labels else ''}cases for split={split!r}"
                             + (" and the given case_ids" if case_ids is not None else ""))
    n_channels = {len(r["channels"]) for c in cases for r in c}
    if len(n_channels) > 1:
        raise DataError(f"stores {stores} mix cases with {sorted(n_channels)} channels")
    if weights is None:
        weights = [float(len(c)) for c in cases]
    check_weights(weights, len(stores))
    shard = grain.sharding.ShardOptions(shard_index=shard_index, shard_count=shard_count, drop_remainder=True)
    sampler = grain.samplers.IndexSampler(num_records=cfg.epoch_length, shard_options=grain.sharding.NoSharding(),
                                          shuffle=True, num_epochs=num_epochs, seed=cfg.seed)
    sampler = GlobalBatchSampler(sampler, cfg.batch_size, shard_count, cfg.workers)
    ops = [PatchSampler(stores, cases, weights, cfg, labels, paste_into),
           grain.transforms.Batch(batch_size=cfg.batch_size, drop_remainder=True)]
    return grain.DataLoader(data_source=IndexSource(cfg.epoch_length), sampler=sampler, operations=ops,
                            worker_count=cfg.workers, worker_buffer_size=max(1, cfg.prefetch), shard_options=shard,
                            read_options=grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(1, cfg.prefetch)))
