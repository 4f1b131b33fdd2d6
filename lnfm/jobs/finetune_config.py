"""The finetuning job's typed configuration (`config.yaml` of a finetuning run).

Apart from the job so that export can read a run's config without importing the job.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Literal

from lnfm.config import to_dict
from lnfm.data.loader import PASTE_KEYS, LoaderConfig
from lnfm.data.loader import unread_keys as loader_unread
from lnfm.eval.inference import InferenceConfig
from lnfm.eval.metrics import EvalConfig
from lnfm.eval.metrics import unread_keys as metrics_unread
from lnfm.eval.postprocess import PostprocessConfig
from lnfm.models import ModelConfig
from lnfm.models.build import unread_keys as model_unread
from lnfm.models.heads.config import HeadConfig
from lnfm.models.sharding import MeshConfig
from lnfm.segmentation.losses import LossConfig
from lnfm.segmentation.losses import unread_keys as loss_unread
from lnfm.segmentation.sites import SiteConfig
from lnfm.segmentation.strategies import StrategyConfig
from lnfm.segmentation.strategies import unread_keys as strategy_unread
from lnfm.train.checkpoint import CheckpointConfig
from lnfm.train.optim import OptimConfig
from lnfm.train.optim import unread_keys as optim_unread


@dataclasses.dataclass
class FinetuneTrainConfig:
    steps: int = 2000  # optimizer steps per repeat
    global_batch: int = 2  # patches per step over all hosts
    accum_steps: int = 1  # gradient-accumulation microbatches per step
    seed: int = 0  # repeat r uses seed + r for its few-shot subset, head init and sampling
    log_every: int = 10  # write training metrics every N steps
    eval_every: int = 200  # validate (and keep the best model) every N steps; 0: only at the end
    num_labeled: int | None = None  # labelled training cases per repeat (null: the whole training split)
    repeats: int = 1  # independent runs (subset + init seeds); summary.json reports mean and std
    val_fraction: float = 0.15  # share of training cases held out for validation when the store has no val split


@dataclasses.dataclass
class FinetuneConfig:
    site: SiteConfig = dataclasses.field(default_factory=SiteConfig)  # anatomical site preset values
    init: str = "scratch"  # pretraining workdir, its checkpoints dir, an export dir, or scratch
    data: list[str] = dataclasses.field(default_factory=list)  # prepared stores with labelled cases
    # Self-training: a teacher trained on the labelled cases pseudo-labels these stores' scans, and the
    # model kept is a student trained on both (lnfm/jobs/finetune.py). Empty: no self-training.
    unlabelled: list[str] = dataclasses.field(default_factory=list)  # prepared stores of unlabelled scans
    # Node paste: labelled nodes are pasted into fat of these stores' scans for loader.paste_p of the
    # patches (lnfm/data/paste.py). Empty: off.
    paste_into: list[str] = dataclasses.field(default_factory=list)  # prepared stores of unlabelled scans
    model: ModelConfig = dataclasses.field(  # backbone (taken from the checkpoint with --init)
        default_factory=ModelConfig)
    head: HeadConfig = dataclasses.field(default_factory=HeadConfig)  # segmentation head
    strategy: StrategyConfig = dataclasses.field(default_factory=StrategyConfig)  # which parameters train
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)  # segmentation loss
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)  # AdamW + schedule (+ LLRD scales)
    loader: LoaderConfig = dataclasses.field(  # patch sampling; patch, window and batch come from site/train
        default_factory=LoaderConfig)
    train: FinetuneTrainConfig = dataclasses.field(default_factory=FinetuneTrainConfig)  # run length and few-shot
    inference: InferenceConfig = dataclasses.field(default_factory=InferenceConfig)  # sliding window (roi = site.patch)
    postprocess: PostprocessConfig = dataclasses.field(default_factory=PostprocessConfig)  # mask clean-up
    # The tuned values are the run's (postprocess.json) and travel in model.json.
    tune_postprocess: bool = True  # tune postprocess.min_short_axis_mm / max_elongation on the validation cases
    # "encoder": the CT window and PET scale the --init encoder was pretrained with (recorded in its run or
    # export); "site": the site preset's window. Scratch runs use the site window.
    normalization: Literal["encoder", "site"] = "encoder"  # intensities as the encoder was pretrained, or the site's
    metrics: EvalConfig = dataclasses.field(default_factory=EvalConfig)  # test metrics settings
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)  # device mesh and sharding rules
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)  # Orbax saving


def unread_keys(cfg: FinetuneConfig) -> dict[str, str]:
    """Every key this run's modes never read -> why: the strategy's, loss's, test metrics', LR schedule's, node
    paste's, deep supervision's, a non-square patch's rot90 and the model keys only pretraining reads
    (`lnfm.config.refuse_unread` refuses those the user set)."""
    paste = {} if cfg.paste_into else {f"loader.{k}": "read only with --paste-into (node paste), which is not given"
                                       for k in PASTE_KEYS}
    deep = {} if cfg.head.deep_supervision else {
        "loss.deep_supervision_decay": "read only with head.deep_supervision=true, and head.deep_supervision is false"}
    return {**strategy_unread(cfg.strategy), **loss_unread(cfg.loss), **metrics_unread(cfg.metrics),
            **optim_unread(cfg.optim), **model_unread(cfg.model, finetuning=True), **paste, **deep,
            **loader_unread(cfg.site.patch, "loader", "site.patch")}


def model_overrides(model: ModelConfig) -> list[str]:
    """A pretraining config's model section as finetuning overrides (a scratch run with its architecture), less
    the keys finetuning never reads, which it refuses as overrides (the encoder is the same without them)."""
    unread = model_unread(model, finetuning=True)
    return [f"model.{k}={json.dumps(v)}" for k, v in to_dict(model).items() if f"model.{k}" not in unread]
