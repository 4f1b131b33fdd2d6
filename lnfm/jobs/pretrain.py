"""Self-supervised pretraining job (MAE on ViT, SimMIM on Swin) over prepared CT stores.

    python pretrain/pretrain.py --config vit_tiny --data STORE[,STORE...] --workdir DIR [key=value ...]

The job resumes from the newest checkpoint in DIR/checkpoints, writes
DIR/metrics.jsonl, TensorBoard events and preview PNGs, and exits 0 after a
SIGTERM/SIGINT once the current step is saved. See docs/pretraining.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from lnfm.config import (ConfigError, given_keys, load_config, override_keys, parse_args_once, refuse_batch_in_file,
                         refuse_derived, refuse_derived_in_files, refuse_unread, to_dict)
from lnfm.data.contract import Normalization, Preprocessing, common_contract
from lnfm.data.pseudo_labels import scan_fingerprint
from lnfm.data.loader import LABEL_ONLY_KEYS, LoaderConfig, check_loader, check_weights, make_loader
from lnfm.data.loader import unread_keys as loader_unread
from lnfm.data.store import check_stores, content_fingerprint
from lnfm.errors import DataError
from lnfm.models import ModelConfig
from lnfm.models.build import build_ssl_model
from lnfm.models.build import unread_keys as model_unread
from lnfm.runs import PretrainRun
from lnfm.models.mae import num_visible, patchify, reconstruct, unpatchify
from lnfm.models.sharding import MeshConfig, abstract_sharded_model, batch_sharding, create_sharded_model, use_rules
from lnfm.train.checkpoint import CheckpointConfig
from lnfm.train.distributed import initialize
from lnfm.train.distributed import add_arguments as add_distributed_arguments
from lnfm.train.loop import Hook, LoopResult, Throughput, parse_profile_steps
from lnfm.train.memory import cpu_host_memory, judge_host_memory, memory_figures, worth_compiling
from lnfm.train.mfu import forward_flops, train_flops
from lnfm.train.optim import OptimConfig, make_optimizer
from lnfm.train.optim import unread_keys as optim_unread
from lnfm.train.state import create_train_state, merge_model, step_key
from lnfm.train.job import (Checked, check_channels, check_run_config, content_keys, device_batch, fit,
                            run_training_job)
from lnfm.train.step import make_train_step
from lnfm.workdir import MetricsWriter, check_job_folder, read_metrics, remove_stale_temps, temp_file

log = logging.getLogger("lnfm.pretrain")

RESUME_KEYS = ("model",)  # config sections a resumed run must keep (the checkpoint's shapes follow them)


@dataclasses.dataclass
class PretrainDataConfig(LoaderConfig):
    """The loader settings plus which cases to draw; patch_size and batch_size are set by the job."""
    weights: tuple[float, ...] = ()  # mixing weight per --data store (empty: in proportion to case counts)
    split: str | None = "train"  # manifest split to pretrain on (null: every case, labelled or not)
    spacing: tuple[float, float, float] | None = None  # voxel size (mm) the stores must be prepared at; null: any


@dataclasses.dataclass
class TrainConfig:
    steps: int = 100_000  # optimizer steps in the whole run
    global_batch: int = 64  # volumes per optimizer step over all hosts (split evenly across processes)
    accum_steps: int = 1  # gradient-accumulation microbatches per step (must divide the per-step batch)
    seed: int = 0  # model initialisation and mask RNG
    log_every: int = 10  # write metrics every N steps
    image_every: int = 1000  # preview PNG (input / masked / reconstruction) every N steps; 0 disables
    profile_steps: str = ""  # 'A:B' traces steps A..B-1 into DIR/profile (also --profile-steps)


@dataclasses.dataclass
class PretrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)  # backbone + SSL head
    data: PretrainDataConfig = dataclasses.field(default_factory=PretrainDataConfig)  # HU window, augmentation, mixing
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)  # device mesh and sharding rules
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)  # AdamW + LR schedule
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)  # run length, batch, logging
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)  # Orbax saving


# data keys pretraining derives from other sections (`run`'s checks record the values the loader reads)
DERIVED_DATA_KEYS = {"data.patch_size": "model.img_size", "data.batch_size": "train.global_batch"}


def load_pretrain_config(name_or_yaml: str, overrides: list[str] = ()) -> PretrainConfig:
    refuse_derived(overrides, DERIVED_DATA_KEYS, "pretraining")
    cfg = load_config(PretrainConfig, name_or_yaml, list(overrides), kind="pretrain")
    # The loader's label-only keys would be recorded in config.yaml and never read (pretraining draws unlabelled
    # patches). An override names one whatever its value; a config file only by a value other than the default
    # (a run's own config.yaml, given as --config, records every key at its default).
    given = override_keys(overrides)
    unread = [f"data.{k}" for k in LABEL_ONLY_KEYS
              if f"data.{k}" in given or getattr(cfg.data, k) != getattr(LoaderConfig(), k)]
    if unread:
        it = "them" if len(unread) > 1 else "it"
        raise ConfigError(f"{', '.join(unread)}: the loader reads {it} only for labelled patches and pretraining draws "
                          f"unlabelled ones (the run would record {it} and never use {it}); drop {it}")
    # A model or optim key the user set that the chosen arch or schedule never reads (a preset's are not theirs).
    user = given_keys(PretrainConfig, name_or_yaml, overrides, kind="pretrain")
    refuse_unread(user, {**model_unread(cfg.model, finetuning=False), **optim_unread(cfg.optim),
                         **loader_unread(cfg.model.img_size, "data", "model.img_size")})
    refuse_derived_in_files(user, {"data.patch_size": ("model.img_size", cfg.data.patch_size, cfg.model.img_size)},
                            "pretraining")
    refuse_batch_in_file(user, "data.batch_size", cfg.data.batch_size, cfg.train.global_batch, "pretraining")
    return cfg


def preview_png(images, aux: dict, patch: tuple[int, int, int], norm_pix: bool):
    """Middle axial slice of sample 0: input | masked input | reconstruction -> (RGB uint8 (H, W, 3), PNG bytes)."""
    import jax.numpy as jnp
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    img = jnp.asarray(images[:1], jnp.float32)
    mask = jnp.asarray(aux["mask"][:1])
    masked = unpatchify(patchify(img, patch) * (1 - mask[..., None]), patch, img.shape[1:4], img.shape[-1])
    recon = reconstruct(img, jnp.asarray(aux["pred"][:1]), mask, patch, norm_pix)
    z = img.shape[3] // 2
    panels = [np.asarray(v[0, :, :, z, 0]).T[::-1] for v in (img, masked, recon)]  # rows = anterior at top
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.2), dpi=80)
    for ax, panel, title in zip(axes, panels, ("input", "masked input", "reconstruction")):
        ax.imshow(panel, cmap="gray", vmin=0.0, vmax=1.0)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    return np.asarray(plt.imread(buf, format="png")[..., :3] * 255, np.uint8), buf.getvalue()


def write_preview(path: Path, png: bytes) -> None:
    """DIR/images/step_N.png, written whole (`temp_file`: the fixed `.step_N.png.tmp` it used before was left
    half-written by a full disk or a kill, and nothing removed it). The job holds the workdir, so any temporary
    file there is a killed run's: those go first, the earlier fixed ones too."""
    check_job_folder(path, "images")  # the mkdir would remake a moved workdir at its old path
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    for old in path.parent.glob(".step_*.png.tmp"):
        old.unlink(missing_ok=True)
    with temp_file(path) as tmp:
        tmp.write_bytes(png)
        os.replace(tmp, path)


def _preview_hook(cfg: PretrainConfig, graphdef: Any, last: dict, workdir: Path, writer: Any) -> Hook:
    """Every train.image_every steps: PNG of the latest batch's first volume into DIR/images and TensorBoard."""
    @jax.jit
    def preview_aux(params, frozen, rest, images, rng):
        return merge_model(graphdef, params, frozen, rest)(images, step_key(rng, 0))[1]

    def write(step: int, state: dict) -> None:
        images = last["image"]
        aux = preview_aux(state["params"], state["frozen"], state["rest"], images, state["rng"])
        # This host's first volume (the global batch may span hosts).
        sample = np.asarray(images.addressable_shards[0].data)
        aux = {k: np.asarray(v.addressable_shards[0].data) for k, v in aux.items()}
        rgb, png = preview_png(sample, aux, tuple(cfg.model.patch_size), cfg.model.norm_pix)
        if jax.process_index() == 0:
            write_preview(workdir / "images" / f"step_{step}.png", png)
            writer.image("reconstruction", step, rgb)

    return Hook(cfg.train.image_every, write)


def build_training(cfg: PretrainConfig, mesh: jax.sharding.Mesh, abstract: bool = False
                   ) -> tuple[Any, dict, Any, Any]:
    """Sharded SSL model + optimizer -> (graphdef, train state, state shardings, jitted step).

    `abstract=True` builds the same state as ShapeDtypeStructs carrying their shardings,
    allocating nothing: the scale planner lowers and compiles this very step."""
    tc = cfg.train
    build = abstract_sharded_model if abstract else create_sharded_model
    model = build(lambda: build_ssl_model(cfg.model, nnx.Rngs(tc.seed)), mesh, cfg.mesh.rules)
    tx, schedule = make_optimizer(cfg.optim, nnx.state(model, nnx.Param), tc.steps, tc.global_batch)
    graphdef, state, shardings = create_train_state(model, tx, tc.seed, NamedSharding(mesh, PartitionSpec()))

    def loss_fn(params, frozen, rest, batch, key):
        return merge_model(graphdef, params, frozen, rest)(batch["image"], key)

    step_fn = make_train_step(loss_fn, tx, schedule, shardings, batch_sharding(mesh), accum_steps=tc.accum_steps)
    return graphdef, state, shardings, step_fn


def step_flops(cfg: PretrainConfig, graphdef: Any, state: dict) -> float | None:
    """Model FLOPs of one optimizer step on the global batch (3 x the SSL forward pass)."""
    images = jax.ShapeDtypeStruct((cfg.train.global_batch, *cfg.model.img_size, cfg.model.in_channels), np.float32)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)

    def forward(params, frozen, rest, images, rng):
        return merge_model(graphdef, params, frozen, rest)(images, step_key(rng, 0))[0]

    return train_flops(forward_flops(forward, abstract["params"], abstract["frozen"], abstract["rest"], images,
                                     abstract["rng"]))


def abstract_batch(cfg: PretrainConfig, mesh: jax.sharding.Mesh) -> dict:
    shape = (cfg.train.global_batch, *cfg.model.img_size, cfg.model.in_channels)
    return {"image": jax.ShapeDtypeStruct(shape, "float32", sharding=batch_sharding(mesh))}


def check_memory(cfg: PretrainConfig, mesh: jax.sharding.Mesh, memory: tuple[int, int] | None = None) -> None:
    """On a CPU host: the loader's batches plus XLA's peak of the compiled step (the planner's figure, per
    device, times this host's devices) against the host's memory (lnfm.train.memory). The step is compiled
    only when it could need half the free memory at the heaviest step's figure per voxel."""
    if (memory := cpu_host_memory(memory)) is None:
        return
    tc, voxels = cfg.train, math.prod(cfg.model.img_size)
    host_batch = tc.global_batch // jax.process_count() * voxels * cfg.model.in_channels * 4
    # the loader's buffers and the batch being assembled (the device's copy is among the step's arguments)
    need = {"batches": host_batch * (cfg.data.prefetch * max(1, cfg.data.workers) + 1)}
    micro_voxels = tc.global_batch // jax.process_count() // max(1, tc.accum_steps) * voxels
    if worth_compiling(need["batches"], micro_voxels, memory):
        _, state, _, step_fn = build_training(cfg, mesh, abstract=True)
        with use_rules(mesh, cfg.mesh.rules):
            compiled = step_fn.lower(state, abstract_batch(cfg, mesh)).compile()
        need["step"] = memory_figures(compiled)["peak"] * jax.local_device_count()
    split = need.get("step", 0) > need["batches"]  # accumulation splits the activations, not the batch
    what = f"train.global_batch={tc.global_batch} of {'x'.join(map(str, cfg.model.img_size))} patches"
    judge_host_memory(need, memory, what, "lower train.global_batch or model.img_size"
                      + (", or raise train.accum_steps or set model.remat=full" if split else ""))


def check_token_grid(model: ModelConfig) -> None:
    """The MAE's patch holds whole ViT tokens, and its mask leaves at least one visible and hides one:
    otherwise the first step fails with a traceback after the workdir is written."""
    if model.arch != "vit":
        return
    img, patch = list(model.img_size), list(model.patch_size)
    if any(i % p for i, p in zip(img, patch)):
        raise ConfigError(f"model.img_size {img} is not a whole number of model.patch_size {patch} tokens")
    n = math.prod(i // p for i, p in zip(img, patch))
    try:
        num_visible(n, model.mask_ratio)
    except ValueError:
        keep = n - int(round(n * model.mask_ratio))
        raise ConfigError(f"model.img_size {img} holds {n} token(s) of {patch} and model.mask_ratio "
                          f"{model.mask_ratio:g} leaves {keep} visible: masked pretraining needs at least one "
                          f"visible and one hidden (raise model.img_size or change model.mask_ratio)") from None


def check_pretrain_config(cfg: PretrainConfig) -> None:
    """Pretraining's checks of its config alone (the shared training sections, the token grid, the data
    section), before its stores are read: the job and the transfer study run them."""
    check_run_config(cfg)
    check_token_grid(cfg.model)
    check_loader(cfg.data, "data")


def pretrain_preprocessing(cfg: PretrainConfig, stores: list[str]) -> Preprocessing:
    """What finetuning and export repeat: the stores' one contract and the intensity normalisation."""
    return Preprocessing(common_contract(stores), Normalization(cfg.data.hu_window, cfg.data.pet_scale),
                         cfg.model.img_size)


@dataclasses.dataclass
class _Data:
    """What pretraining's checks resolved (the `check` in `run`)."""
    stores: list[str]
    manifests: list[list[dict]]  # each store's records as the checks read them (`check_stores`)
    weights: list[float] | None
    counts: Any  # cases per store, for the log
    profile: tuple[int, int] | None


def check_distinct_stores(stores: list[str], manifests: list[list[dict]], split: str | None) -> None:
    """Refuse a --data store given twice (the same folder, a link to it, or a copy of it): every scan of it
    would be sampled twice as often. Scans are matched by content (`scan_fingerprint`), as finetuning's
    unlabelled stores are, so two datasets that both name a case `case_000` still train together. `manifests`:
    each store's records (`check_stores`)."""
    seen: dict[str, str] = {}
    for store in stores:
        if "://" in store:
            continue
        real = os.path.realpath(store)
        if real in seen:
            raise DataError(f"--data: {store} and {seen[real]} are the same store: every scan would train twice "
                            f"(list each store once)")
        seen[real] = store
    scans: dict[str, tuple[str, str]] = {}
    for store, records in zip(stores, manifests):
        for rec in records:
            if not rec.get("intensity") or (split is not None and rec.get("split") != split):
                continue  # a record without intensity statistics has no reliable fingerprint
            key = scan_fingerprint(rec)
            other = scans.get(key)
            if other is not None and other[0] != store:
                raise DataError(f"--data: case {rec['case_id']} of {store} is the same scan as case {other[1]} of "
                                f"{other[0]}: every such scan would train twice (list each store once)")
            scans.setdefault(key, (store, rec["case_id"]))


DATA_RECORD = "data.json"  # the case ids of each --data store, recorded at the first start


def run(cfg: PretrainConfig, stores: list[str], workdir: str | Path, profile_steps: str | None = None) -> int:
    """Pretrain (or resume) into `workdir`. Returns the process exit code (0: finished or preempted)."""

    def check(cfg: PretrainConfig) -> Checked:  # before anything compiles
        check_pretrain_config(cfg)
        # config.yaml records the patch and the per-process batch the loader reads (DERIVED_DATA_KEYS)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(
            cfg.data, patch_size=tuple(cfg.model.img_size), batch_size=cfg.train.global_batch // jax.process_count()))
        manifests = check_stores(stores, cfg.data.split, cfg.data.spacing)
        check_distinct_stores(stores, manifests, cfg.data.split)
        prep = pretrain_preprocessing(cfg, stores)
        check_channels(len(prep.contract.channels), cfg.model.in_channels, "the model (model.in_channels)")
        weights = list(cfg.data.weights) or None
        if weights is not None:  # here, before the workdir is written (the loader checks them after)
            check_weights(weights, len(stores), "data.weights")
        if cfg.optim.ema_decay:  # nothing downstream reads a pretraining average: refuse it, not ignore it
            raise ConfigError(f"optim.ema_decay={cfg.optim.ema_decay:g}: the moving average applies to finetuning only")
        profile = parse_profile_steps(profile_steps if profile_steps is not None else cfg.train.profile_steps)
        # The cases each store gives (by position in --data, never by path): a resume over other data would
        # continue the loader's saved position in another dataset.
        used = [[r for r in m if cfg.data.split is None or r.get("split") == cfg.data.split] for m in manifests]
        cases = {f"store_{i + 1}": sorted(r["case_id"] for r in rs) for i, rs in enumerate(used)}
        counts = [len(c) for c in cases.values()]
        content = [(key, s, {r["case_id"]: content_fingerprint(r) for r in rs})
                   for (key, s), rs in zip(content_keys("store", stores), used)]
        return Checked(cfg, prep, _Data(stores, manifests, weights, counts, profile), records={DATA_RECORD: cases},
                       content=content)

    return run_training_job(cfg, PretrainRun(Path(workdir)), inputs={"--data": stores}, resume_keys=RESUME_KEYS,
                            check=check, train=_train, check_memory=lambda c, mesh: check_memory(c.cfg, mesh),
                            derived_keys=tuple(DERIVED_DATA_KEYS))


def _train(checked: Checked, run: PretrainRun, mesh: jax.sharding.Mesh, writer: MetricsWriter) -> dict | None:
    cfg, data, workdir = checked.cfg, checked.context, run.root
    tc = cfg.train
    nproc, pid = jax.process_count(), jax.process_index()
    # Stores by position in --data, never by path: logs carry no input folder names.
    log.info("%d dataset(s) (%s cases; weights %s)", len(data.stores), data.counts, data.weights or "by case count")
    log.info("mesh %s over %d devices (%s), %d processes", dict(mesh.shape), jax.device_count(),
             jax.devices()[0].device_kind, nproc)
    graphdef, state, shardings, step_fn = build_training(cfg, mesh)
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    log.info("model %s-%s: %.2fM trainable parameters", cfg.model.arch, cfg.model.size, n_params / 1e6)

    loader = make_loader(data.stores, cfg.data, split=cfg.data.split, labels=False, weights=data.weights,
                         shard_index=pid, shard_count=nproc, manifests=data.manifests)
    data_iter = iter(loader)
    bsh = batch_sharding(mesh)
    last: dict = {}

    def next_batch() -> dict:
        last.update(device_batch(next(data_iter), bsh, {"image": np.float32}))
        return {"image": last["image"]}

    hooks = (_preview_hook(cfg, graphdef, last, workdir, writer),) if tc.image_every and cfg.model.arch == "vit" else ()
    patch = cfg.model.patch_size if cfg.model.arch == "vit" else cfg.model.swin_patch_size
    tokens = tc.global_batch * math.prod(s // p for s, p in zip(cfg.model.img_size, patch))
    throughput = Throughput(tc.global_batch, tokens, step_flops(cfg, graphdef, state))
    started: list[int] = []
    t0 = time.time()
    result = fit(step_fn, state, shardings, next_batch, data_iter, workdir=workdir, checkpoint=cfg.checkpoint,
                 mesh=mesh, rules=cfg.mesh.rules, total_steps=tc.steps, writer=writer, throughput=throughput,
                 config=to_dict(cfg), log_every=tc.log_every, hooks=hooks, profile=data.profile, desc="pretrain",
                 on_resume=started.append)
    fit_time = time.time() - t0
    log.info("%s at step %d", "preempted" if result.preempted else "finished", result.step)
    if result.preempted:
        return None
    return pretrain_summary(checked.preprocessing, result, started[0], fit_time, workdir)


def pretrain_summary(prep: Preprocessing, result: LoopResult, start: int, fit_time: float, workdir: Path) -> dict:
    """summary.json of a finished pretraining run: where training ended and what it trained under.
    `steps_per_s` counts this invocation's steps over its fit time (compilation and saves included)."""
    loss = result.metrics.get("loss")
    if loss is None:  # no step ran (a finished run started again): the loss its last step logged
        loss = next((r["loss"] for r in reversed(read_metrics(workdir)) if r["step"] == result.step), None)
    steps = result.step - start
    return {"step": result.step, "loss": loss, "resumed_from": start or None, "steps_run": steps,
            "fit_time_s": fit_time, "steps_per_s": steps / fit_time if steps else None,
            "spacing_mm": prep.contract.spacing, "channels": prep.contract.channels,
            "hu_window": prep.normalization.hu_window, "pet_scale": prep.normalization.pet_scale,
            "patch_size": prep.patch_size}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="lnfm pretrain",
                                 description="Self-supervised pretraining (MAE / SimMIM) on prepared CT stores.")
    ap.add_argument("--config", required=True, help="packaged preset (vit_tiny, vit_b, vit_l, vit_h, swin_b) or YAML")
    ap.add_argument("--data", required=True, help="comma-separated prepared stores (mix with data.weights=...)")
    ap.add_argument("--workdir", required=True, help="output folder; an existing run there is resumed")
    ap.add_argument("--profile-steps", default=None, help="A:B traces steps A..B-1 into WORKDIR/profile")
    add_distributed_arguments(ap)
    ap.add_argument("overrides", nargs="*", help="config overrides key.sub=value, e.g. train.steps=100")
    return parse_args_once(ap, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    initialize(args.coordinator, args.num_processes, args.process_id)  # before any other JAX call
    if args.profile_steps is not None and "train.profile_steps" in override_keys(args.overrides):  # 1 traced, 1 kept
        raise ConfigError("train.profile_steps: set by --profile-steps; give it there, not as an override as well")
    cfg = load_pretrain_config(args.config, args.overrides)
    stores = [s for s in args.data.split(",") if s]
    return run(cfg, stores, args.workdir, args.profile_steps)
