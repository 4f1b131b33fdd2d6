"""The finetuning job: site presets, config resolution, a few steps per site on 8 devices,
few-shot repeats with summary.json, the saved best model, and one-line input errors."""

import dataclasses
import json
import logging
import re
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from override_helpers import once
from sphere_cases import write_spheres

from lnfm.config import ConfigError, dump_yaml
from lnfm.data.contract import ContractError
from lnfm.cli import run_job
from lnfm.jobs.finetune import (QUICK, build_training, load_finetune_config, load_finetuned, make_splits, parse_args,
                                resolve_init, run)
from lnfm.runs import RepeatRun
from lnfm.segmentation.sites import SITES, site_names
from lnfm.train.optim import peak_lr


KEYS = ("dice", "hd95", "assd", "nsd", "node_sensitivity", "fp_per_volume")
# 8 virtual devices: the global batch is one patch per device; tiny ViT and linear probe.
TINY = ["site.patch=[16,16,16]", "model.img_size=[16,16,16]", "model.patch_size=[8,8,8]", "model.depth=2",
        "train.global_batch=8", "train.steps=2", "train.eval_every=0", "train.log_every=1", "head.kind=linear",
        "checkpoint.every=0", "inference.sw_batch_size=8", "inference.overlap=0.0", "optim.warmup_steps=0"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from lnfm.data.prepare import PrepareConfig, prepare_dataset
    from lnfm.data.synth import SynthConfig, write_dataset

    root = tmp_path_factory.mktemp("ft")
    write_dataset(SynthConfig(site="pelvis", num_cases=8, seed=1, shape=(40, 40, 24), gallery=False,
                              use_real_shapes=False, spacing_inplane=(1.4, 1.6), slice_thickness=(1.5, 1.5),
                              nodes_per_case=(2, 3), short_axis_mm=(8.0, 12.0)), root / "raw")
    out = str(root / "store")
    prepare_dataset(str(root / "raw"), out, PrepareConfig(spacing=(1.5, 1.5, 1.5), workers=0,
                                                           split_fractions=(0.6, 0.0, 0.4)), show_progress=False)
    return out


def pretrain_run(tmp_path: Path, config: dict) -> Path:
    """A pretraining run's folder as --init reads it before any restore: its config.yaml and checkpoints/."""
    pre = tmp_path / "pre"
    (pre / "checkpoints").mkdir(parents=True)
    (pre / "config.yaml").write_text(yaml.safe_dump(config))
    return pre


def test_every_site_preset_loads_with_rationale():
    assert sorted(SITES) == site_names()
    for site in SITES:
        cfg = load_finetune_config(site, data=["x"])
        assert cfg.site.name == site and cfg.site.labels[0] == "background" and cfg.site.stations
        assert cfg.site.window[0] < cfg.site.window[1] and min(cfg.site.spacing) > 0
        assert cfg.head.kind in ("unetr", "light", "fine", "linear")
        assert cfg.strategy.freeze in ("all", "first_k", "none", "lora")
        text = (Path(__file__).parents[2] / "lnfm/configs/sites" / f"{site}.yaml").read_text()
        assert text.count("#") >= 3  # every preset explains its choices
    pelvis = load_finetune_config("pelvis")
    assert {"obturator", "internal_iliac", "external_iliac", "common_iliac", "presacral"} <= set(pelvis.site.stations)
    med, pel = load_finetune_config("mediastinum"), pelvis
    assert med.site.window[1] - med.site.window[0] < pel.site.window[1] - pel.site.window[0]
    assert np.prod(med.site.patch) * np.prod(med.site.spacing) > np.prod(pel.site.patch) * np.prod(pel.site.spacing)


def test_quick_and_overrides_and_unknown_keys():
    cfg = load_finetune_config("pelvis", ["train.steps=7"], quick=True, num_labeled=3, repeats=2)
    assert cfg.site.patch == (32, 32, 32) and cfg.train.steps == 7 and cfg.head.kind == "fine"
    assert cfg.strategy.freeze == "first_k" and cfg.strategy.k == 2  # --quick keeps the site's strategy
    assert cfg.train.num_labeled == 3 and cfg.train.repeats == 2 and cfg.init == "scratch"
    assert cfg.optim.lr == pytest.approx(2e-3) and cfg.optim.weight_decay == pytest.approx(1e-4)
    assert any(q.startswith("site.patch") for q in QUICK)
    with pytest.raises(ConfigError, match="strategy.freez.*freeze"):
        load_finetune_config("pelvis", ["strategy.freez=all"])
    with pytest.raises(ConfigError, match="unknown sites config 'pelvic'.*pelvis"):
        load_finetune_config("pelvic")


def test_a_base_lr_override_is_the_learning_rate_used():
    """DEFAULTS and --quick set optim.lr, which replaces the base_lr scaling: a user's optim.base_lr wins over
    them, and giving both is refused in one line."""
    cfg = load_finetune_config("pelvis", ["optim.base_lr=0.5", "train.global_batch=2"], quick=True)
    assert cfg.optim.lr is None and peak_lr(cfg.optim, cfg.train.global_batch) == pytest.approx(0.5 * 2 / 256)
    assert load_finetune_config("pelvis", ["optim.base_lr=0.5"]).optim.lr is None
    with pytest.raises(ConfigError, match=r"^optim.base_lr: optim.lr is given as well and replaces it; give one"):
        load_finetune_config("pelvis", ["optim.base_lr=0.5", "optim.lr=0.01"])


def test_a_size_prior_override_is_refused_while_it_is_tuned():
    """The tuned size prior replaced a user's postprocess.min_short_axis_mm / max_elongation in postprocess.json
    and the export while config.yaml recorded the user's; with tuning off they are the run's."""
    prior = ["postprocess.min_short_axis_mm=5", "postprocess.max_elongation=3"]
    with pytest.raises(ConfigError, match=r"^postprocess.max_elongation, postprocess.min_short_axis_mm: "
                                          r"tune_postprocess=true \(the default\) replaces the size prior .*; "
                                          r"set tune_postprocess=false to keep yours$"):
        load_finetune_config("pelvis", prior)
    with pytest.raises(ConfigError, match=r"^postprocess.min_short_axis_mm: tune_postprocess=true replaces"):
        load_finetune_config("pelvis", [prior[0], "tune_postprocess=true"])
    post = load_finetune_config("pelvis", [*prior, "tune_postprocess=false"]).postprocess
    assert (post.min_short_axis_mm, post.max_elongation) == (5.0, 3.0)


def test_a_size_prior_in_the_site_file_is_refused_while_it_is_tuned(tmp_path):
    """The user's --site file is theirs as an override is (`given_keys`, as refuse_unread reads it): its size prior
    was replaced by the tuned one without a word. A run's config.yaml given back records the preset's prior."""
    site = tmp_path / "site.yaml"
    site.write_text("base: pelvis\npostprocess: {min_short_axis_mm: 5}\n")
    with pytest.raises(ConfigError, match=rf"^{site}: postprocess.min_short_axis_mm: tune_postprocess=true \(the "
                                          r"default\) replaces the size prior .*; set tune_postprocess=false"):
        load_finetune_config(str(site))
    site.write_text("base: pelvis\npostprocess: {min_short_axis_mm: 5}\ntune_postprocess: false\n")
    assert load_finetune_config(str(site)).postprocess.min_short_axis_mm == 5.0
    recorded = tmp_path / "config.yaml"
    recorded.write_text(dump_yaml(load_finetune_config("pelvis")))
    assert load_finetune_config(str(recorded)).tune_postprocess


@pytest.mark.parametrize("overrides, says", [
    (["strategy.freeze=lora", "strategy.k=5"], r"strategy.k: read only with strategy.freeze=first_k, and "
                                               r"strategy.freeze is lora"),
    (["strategy={freeze: lora, k: 5}"], r"strategy.k: .*, and strategy.freeze is lora"),  # a whole section
    (["strategy.freeze=all", "strategy.llrd=0.5"], r"strategy.llrd: read only with strategy.freeze=first_k or none, "
                                                   r"and strategy.freeze is all"),
    (["strategy.freeze=lora", "strategy.llrd=1"], r"strategy.llrd: .* strategy.freeze is lora"),  # 1 is the default
    (["strategy.lora_rank=4"], r"strategy.lora_rank: read only with strategy.freeze=lora, and strategy.freeze is "
                               r"first_k"),
    (["loss.focal_gamma=5", "loss.tversky_alpha=0.9"], r"loss.focal_gamma: read only with loss.name=dice_focal or "
                                                       r"focal, and loss.name is dice_ce"),
    (["loss.name=ce", "loss.dice_weight=3"], r"loss.dice_weight: read only with loss.name=dice_ce or dice_focal, and "
                                             r"loss.name is ce"),
    (["loss.name=ce", "loss.include_background=true"], r"loss.include_background: .* loss.name is ce"),
    (["metrics.max_distance_mm=3"], r"metrics.max_distance_mm: read only with metrics.criterion=centroid, and "
                                    r"metrics.criterion is overlap"),
    (["metrics.criterion=centroid", "metrics.min_overlap=0.9"], r"metrics.min_overlap: .* metrics.criterion is "
                                                                r"centroid"),
    (["loader.paste_zoom=0.2", "loader.paste_flip=true"], r"loader.paste_flip, loader.paste_zoom: read only with "
                                                          r"--paste-into \(node paste\), which is not given"),
    (["model.mask_ratio=0.5", "model.decoder_width=128"], r"model.decoder_width, model.mask_ratio: read only by "
                                                          r"masked pretraining, not by finetuning"),
    (["model.arch=swin", "model.patch_size=[16,16,16]"], r"model.patch_size: read only by the ViT backbone .*, and "
                                                         r"model.arch is swin"),
    (["optim.schedule=constant", "optim.min_lr_ratio=0.5"], r"optim.min_lr_ratio: read only with "
                                                            r"optim.schedule=cosine, and optim.schedule is constant"),
    (["loss.deep_supervision_decay=0.7"], r"loss.deep_supervision_decay: read only with head.deep_supervision=true, "
                                          r"and head.deep_supervision is false"),
    (["site.patch=[32,16,32]", "loader.rot90=true"], r"loader.rot90: read only for a patch with equal in-plane "
                                                     r"sides, and site.patch is \[32, 16, 32\]"),
])
def test_a_key_the_chosen_mode_never_reads_is_refused(overrides, says):
    """A key the user set that the chosen strategy, loss, metric criterion, schedule, arch or finetuning itself
    never reads was recorded in config.yaml without a word: refused in one line, whatever its value."""
    with pytest.raises(ConfigError, match=rf"^{says} \(the run would record a value it never uses\); drop (it|them)$"):
        load_finetune_config("pelvis", overrides, quick=True)


def test_a_preset_s_value_the_mode_never_reads_is_not_refused(tmp_path):
    """Only the user's keys are refused: the preset's strategy.k / llrd under the user's freeze, DEFAULTS'
    min_lr_ratio under a constant schedule, --quick's model.patch_size with Swin, the --init run's pretraining
    keys, and a site file's packaged base; the site file's own keys are the user's."""
    cfg = load_finetune_config("pelvis", ["strategy.freeze=lora"])
    assert (cfg.strategy.k, cfg.strategy.llrd) == (2, 0.75)  # recorded as the preset gave them
    assert load_finetune_config("mediastinum", ["strategy.freeze=all"]).strategy.llrd == 0.75
    assert load_finetune_config("pelvis", ["optim.schedule=constant"]).optim.min_lr_ratio == 0.1
    assert load_finetune_config("pelvis", ["model.arch=swin"], quick=True).model.patch_size == (8, 8, 8)
    assert load_finetune_config("pelvis", ["head.deep_supervision=true", "loss.deep_supervision_decay=0.7"]
                                ).loss.deep_supervision_decay == 0.7  # read: the mode that reads it
    assert not load_finetune_config("pelvis", ["site.patch=[32,32,16]", "loader.rot90=false"]).loader.rot90
    pre = pretrain_run(tmp_path, {
        "model": {"arch": "vit", "size": "tiny", "patch_size": [8, 8, 8], "img_size": [32, 32, 32], "mask_ratio": 0.5,
                  "decoder_width": 96}, "data": {"hu_window": [-900, 900], "pet_scale": 5.0}})
    assert load_finetune_config("pelvis", init=str(pre), quick=True).model.mask_ratio == 0.5
    with pytest.raises(ConfigError, match=r"^model.mask_ratio: read only by masked pretraining"):
        load_finetune_config("pelvis", ["model.mask_ratio=0.6"], init=str(pre), quick=True)
    site = tmp_path / "site.yaml"
    site.write_text("base: pelvis\nstrategy: {freeze: lora}\n")
    assert load_finetune_config(str(site)).strategy.k == 2
    own = tmp_path / "own.yaml"
    own.write_text(f"base: {site}\nloss: {{name: ce, include_background: false}}\n")  # false: the default
    assert load_finetune_config(str(own)).loss.name == "ce"
    site.write_text("base: pelvis\nstrategy: {freeze: lora, k: 5}\n")  # the base file is the user's too, named
    with pytest.raises(ConfigError, match=rf"^{site}: strategy.k: read only with strategy.freeze=first_k, and "
                                          r"strategy.freeze is lora \(the run would record"):
        load_finetune_config(str(own))
    # A run's config.yaml records its preset's strategy.llrd under freeze=all; given back as --site it loads, and
    # a value edited into it is the user's.
    recorded = tmp_path / "config.yaml"
    recorded.write_text(dump_yaml(load_finetune_config("pelvis", ["strategy.freeze=all"])))
    assert load_finetune_config(str(recorded)).strategy.llrd == 0.75
    recorded.write_text(recorded.read_text().replace("llrd: 0.75", "llrd: 0.5"))
    with pytest.raises(ConfigError, match=rf"^{recorded}: strategy.llrd: read only with strategy.freeze=first_k or "
                                          r"none, and strategy.freeze is all"):
        load_finetune_config(str(recorded))


@pytest.mark.parametrize("labels, says", [
    ("[lymph_node,background]", "the first name must be 'background'"),
    ("[]", "the first name must be 'background'"),
    ("[background,node,node]", "each class needs its own non-empty name"),
    ("[background,'']", "each class needs its own non-empty name"),
])
def test_site_labels_must_start_with_background(labels, says):
    """Label value 0 is background everywhere (metrics, exports, predict reports): reversed names called every
    node 'background'."""
    with pytest.raises(ConfigError, match=r"^site.labels \[.*\]: " + says):
        load_finetune_config("pelvis", [f"site.labels={labels}"])
    assert load_finetune_config("pelvis", ["site.labels=[background,node,other]"]).site.labels[0] == "background"


def test_an_override_given_twice_on_the_command_line_is_refused_and_writes_nothing(store, tmp_path, capsys):
    wd = tmp_path / "ft"
    rc = run_job("finetune", ["--site", "pelvis", "--data", store, "--init", "scratch", "--workdir", str(wd),
                              "--quick", "train.steps=1", "train.global_batch=2", "train.steps=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].endswith("train.steps: given twice as an override; give it once"), err
    assert not wd.exists()


def test_inference_roi_is_the_training_patch(tmp_path):
    """Validation, test and the export window with site.patch: the resolved (recorded) inference.roi is
    site.patch unless set, and a set one that differs is refused in one line."""
    assert load_finetune_config("pelvis", quick=True).inference.roi == (32, 32, 32)  # --quick: 32^3, not 96^3
    assert load_finetune_config("mediastinum").inference.roi == (112, 112, 96)  # the preset's patch
    assert load_finetune_config("pelvis", ["site.patch=[48,40,24]"]).inference.roi == (48, 40, 24)
    assert load_finetune_config("pelvis", ["inference.roi=[32,32,32]"], quick=True).inference.roi == (32, 32, 32)
    with pytest.raises(ConfigError, match=r"^inference.roi \[96, 96, 96\] differs from site.patch \[32, 32, 32\]: "
                                          r"finetuning windows are site.patch"):
        load_finetune_config("pelvis", ["inference.roi=[96,96,96]"], quick=True)  # the old default, now set
    site = tmp_path / "site.yaml"
    site.write_text("base: pelvis\ninference:\n  roi: [64, 64, 64]\n")
    with pytest.raises(ConfigError, match=r"inference.roi \[64, 64, 64\] differs from site.patch \[96, 96, 96\]"):
        load_finetune_config(str(site))


def test_init_takes_the_model_from_the_checkpoint_config(tmp_path):
    model = {"arch": "vit", "size": "tiny", "width": 48, "patch_size": [4, 4, 4], "img_size": [24, 24, 24]}
    pre = pretrain_run(tmp_path, {"model": model})
    with pytest.raises(ContractError, match="records no intensity normalisation"):
        load_finetune_config("pelvis", init=str(pre))
    (pre / "config.yaml").write_text(yaml.safe_dump({"model": model, "data": {"hu_window": [-900, 900],
                                                                              "pet_scale": 5.0}}))
    for init in (str(pre), str(pre / "checkpoints")):
        kind, path, _ = resolve_init(init)
        assert kind == "pretrain" and path == pre
        cfg = load_finetune_config("pelvis", ["model.remat=full"], init=init, quick=True)
        # The checkpoint's architecture wins over the quick preset; model.* overrides still apply.
        assert cfg.model.width == 48 and cfg.model.patch_size == (4, 4, 4) and cfg.model.remat == "full"
        # Intensities as the encoder was pretrained, not the site preset's window ...
        assert cfg.loader.hu_window == (-900.0, 900.0) and cfg.loader.pet_scale == 5.0
    # ... unless the run says otherwise, and a run from scratch uses the site window.
    site = load_finetune_config("pelvis", ["normalization=site"], init=str(pre))
    assert site.loader.hu_window == site.site.window == (-160.0, 240.0)
    assert load_finetune_config("pelvis").loader.hu_window == (-160.0, 240.0)
    # A run that records its preprocessing is read from that record.
    from lnfm.data.contract import Normalization, Preprocessing, PrepareContract, write_preprocessing

    contract = PrepareContract(1, None, "RAS", True, -500.0, ("CT",), "int16", {}, True)
    write_preprocessing(pre / "preprocessing.json", Preprocessing(contract, Normalization((-1000.0, 1000.0), 10.0),
                                                                  (24, 24, 24)))
    assert load_finetune_config("pelvis", init=str(pre)).loader.hu_window == (-1000.0, 1000.0)
    assert resolve_init("scratch")[0] == "scratch"
    with pytest.raises(ConfigError, match="neither a pretraining workdir"):
        resolve_init(str(tmp_path))
    with pytest.raises(ConfigError, match="must be a pretraining workdir"):
        resolve_init(str(tmp_path / "missing"))


def test_a_model_mapping_override_under_init_is_applied_as_its_dotted_keys_are(tmp_path):
    """With --init the model section is the encoder's plus the model.* overrides; "model={depth: 3}" was dropped
    without a word (config.yaml recorded the encoder's depth). It now acts as model.depth=3 does, refusals too."""
    model = {"arch": "vit", "size": "tiny", "width": 48, "depth": 2, "patch_size": [4, 4, 4], "img_size": [24, 24, 24]}
    pre = pretrain_run(tmp_path, {"model": model, "data": {"hu_window": [-175, 250], "pet_scale": 10.0}})
    dotted = load_finetune_config("pelvis", ["model.depth=3", "model.remat=full"], init=str(pre)).model
    mapped = load_finetune_config("pelvis", ["model={depth: 3, remat: full}"], init=str(pre)).model
    assert (mapped.depth, mapped.remat, mapped.width) == (3, "full", 48)  # merged into the encoder's section
    assert mapped == dotted
    for form in (["model.arch=swin"], ["model={arch: swin}"]):
        with pytest.raises(ConfigError, match=r"^model.arch=swin: the --init encoder .*pre is a vit encoder"):
            load_finetune_config("pelvis", form, init=str(pre))
    with pytest.raises(ConfigError, match=r"^model.mask_ratio: read only by masked pretraining"):
        load_finetune_config("pelvis", ["model={mask_ratio: 0.6}"], init=str(pre))


def test_the_site_file_s_model_keys_under_init_go_as_the_model_overrides_do(tmp_path):
    """Under --init the --site file's model section was replaced by the encoder's without a word: its keys now go
    over the encoder's as model overrides do, and one that changes the encoder's weight shapes is refused naming
    the file. A run's config.yaml given back (the encoder's model, pretraining keys included) loads."""
    model = {"arch": "vit", "size": "tiny", "width": 48, "depth": 2, "patch_size": [4, 4, 4], "img_size": [24, 24, 24],
             "mask_ratio": 0.5, "decoder_width": 96, "remat": "full"}
    pre = pretrain_run(tmp_path, {"model": model, "data": {"hu_window": [-175, 250], "pet_scale": 10.0}})
    site = tmp_path / "site.yaml"
    site.write_text("base: pelvis\nmodel: {remat: none, depth: 2}\n")  # none: the dataclass default, not the encoder's
    cfg = load_finetune_config(str(site), init=str(pre)).model
    assert (cfg.remat, cfg.depth, cfg.width) == ("none", 2, 48)
    over = tmp_path / "over.yaml"  # the nearest file's value, the encoder's, is the one the chain gives
    over.write_text(f"base: {site}\nmodel: {{remat: full}}\n")
    assert load_finetune_config(str(over), init=str(pre)).model.remat == "full"
    site.write_text("base: pelvis\nmodel: {depth: 3, width: 48, remat: full}\n")
    with pytest.raises(ConfigError, match=rf"^{site}: model.depth: the --init encoder .*pre has other weight "
                                          r"shapes; finetuning keeps the encoder as it was pretrained: remove it "
                                          r"from the file$"):
        load_finetune_config(str(site), init=str(pre))
    assert load_finetune_config(str(site), ["model.depth=2"], init=str(pre)).model.depth == 2  # the override wins
    site.write_text("base: pelvis\nmodel: {arch: swin}\n")
    with pytest.raises(ConfigError, match=rf"^{site}: model.arch=swin: the --init encoder .*pre is a vit encoder"):
        load_finetune_config(str(site), init=str(pre))
    site.write_text("base: pelvis\nmodel: {mask_ratio: 0.6}\n")
    with pytest.raises(ConfigError, match=rf"^{site}: model.mask_ratio: read only by masked pretraining"):
        load_finetune_config(str(site), init=str(pre))
    recorded = tmp_path / "config.yaml"
    recorded.write_text(dump_yaml(load_finetune_config("pelvis", ["model.remat=none"], init=str(pre))))
    again = load_finetune_config(str(recorded), init=str(pre)).model
    assert (again.remat, again.depth, again.mask_ratio) == ("none", 2, 0.5)


def test_a_site_window_override_is_refused_under_the_encoder_normalization(tmp_path):
    """A typed site.window was ignored under normalization=encoder (training used the encoder's window, config.yaml
    recorded the typed one); it is refused as loader.pet_scale is, and taken with normalization=site."""
    model = {"arch": "vit", "size": "tiny", "width": 48, "patch_size": [4, 4, 4], "img_size": [24, 24, 24]}
    pre = pretrain_run(tmp_path, {"model": model, "data": {"hu_window": [-175, 250], "pet_scale": 10.0}})
    with pytest.raises(ConfigError, match=r"^site.window: with normalization=encoder finetuning uses the encoder's "
                                          r"pretraining window \[-175.0, 250.0\]; set normalization=site to choose"):
        load_finetune_config("pelvis", ["site.window=[-100,200]"], init=str(pre))
    cfg = load_finetune_config("pelvis", ["site.window=[-100,200]", "normalization=site"], init=str(pre))
    assert cfg.loader.hu_window == (-100.0, 200.0)
    # the encoder's own window typed, the preset's window, and a scratch run: nothing to refuse
    assert load_finetune_config("pelvis", ["site.window=[-175,250]"], init=str(pre)).loader.hu_window == (-175.0, 250.0)
    assert load_finetune_config("pelvis", init=str(pre)).loader.hu_window == (-175.0, 250.0)
    assert load_finetune_config("pelvis", ["site.window=[-100,200]"]).loader.hu_window == (-100.0, 200.0)


def test_a_site_window_or_pet_scale_in_the_site_file_is_refused_under_the_encoder_normalization(tmp_path):
    """The user's --site file is theirs as an override is (`given_keys`): its site.window and loader.pet_scale gave
    way to the encoder's without a word. A run's config.yaml given back (the preset's window, the encoder's
    pet_scale) loads."""
    model = {"arch": "vit", "size": "tiny", "width": 48, "patch_size": [4, 4, 4], "img_size": [24, 24, 24]}
    pre = pretrain_run(tmp_path, {"model": model, "data": {"hu_window": [-175, 250], "pet_scale": 7.0}})
    site = tmp_path / "site.yaml"
    site.write_text("base: pelvis\nsite: {window: [-100, 200]}\n")
    with pytest.raises(ConfigError, match=rf"^{site}: site.window: with normalization=encoder finetuning uses the "
                                          r"encoder's pretraining window \[-175.0, 250.0\]; set normalization=site"):
        load_finetune_config(str(site), init=str(pre))
    assert load_finetune_config(str(site), ["normalization=site"], init=str(pre)).loader.hu_window == (-100.0, 200.0)
    site.write_text("base: pelvis\nloader: {pet_scale: 3.0}\n")
    with pytest.raises(ConfigError, match=rf"^{site}: loader.pet_scale: with normalization=encoder finetuning uses "
                                          r"the encoder's pretraining value 7; set normalization=site"):
        load_finetune_config(str(site), init=str(pre))
    recorded = tmp_path / "config.yaml"
    recorded.write_text(dump_yaml(load_finetune_config("pelvis", init=str(pre))))
    cfg = load_finetune_config(str(recorded), init=str(pre))
    assert (cfg.loader.hu_window, cfg.loader.pet_scale) == ((-175.0, 250.0), 7.0)


def test_a_derived_loader_key_in_the_site_file_must_equal_what_finetuning_derives(tmp_path):
    """loader.patch_size and loader.hu_window come from site.patch and the window; set in the user's --site file
    (an override of them is refused) they were replaced without a word, and config.yaml recorded the other value. A
    run's config.yaml, which records the derived values, loads; so does a pretraining --config's own data keys."""
    from lnfm.jobs.pretrain import load_pretrain_config

    site = tmp_path / "site.yaml"
    site.write_text("base: pelvis\nloader: {patch_size: [64, 64, 64]}\n")
    patch = list(load_finetune_config("pelvis").site.patch)
    says = rf"^{site}: loader.patch_size \[64, 64, 64\] differs from {re.escape(str(patch))}, which finetuning sets it"
    with pytest.raises(ConfigError, match=says + r" to from site.patch; remove it from the file"):
        load_finetune_config(str(site))
    site.write_text("base: pelvis\nloader: {hu_window: [-100, 200]}\n")
    with pytest.raises(ConfigError, match=rf"^{site}: loader.hu_window \[-100.0, 200.0\] differs from "):
        load_finetune_config(str(site))
    cfg = load_finetune_config("pelvis")
    recorded = tmp_path / "config.yaml"  # what a run records: the derived patch and window
    recorded.write_text(dump_yaml(dataclasses.replace(cfg, loader=dataclasses.replace(
        cfg.loader, patch_size=tuple(cfg.site.patch)))))
    assert load_finetune_config(str(recorded)).loader.patch_size == tuple(cfg.site.patch)
    conf = tmp_path / "pre.yaml"
    conf.write_text("base: vit_tiny\ndata: {patch_size: [16, 16, 16]}\n")
    with pytest.raises(ConfigError, match=rf"^{conf}: data.patch_size \[16, 16, 16\] differs from .*, which "
                                          r"pretraining sets it to from model.img_size"):
        load_pretrain_config(str(conf))
    img = load_pretrain_config("vit_tiny").model.img_size
    conf.write_text(f"base: vit_tiny\ndata: {{patch_size: {list(img)}}}\n")
    assert tuple(load_pretrain_config(str(conf)).model.img_size) == tuple(img)

def test_a_batch_size_in_a_user_file_must_be_a_share_of_the_global_batch(tmp_path):
    """loader.batch_size (and pretraining's data.batch_size) is train.global_batch over the processes; set in the
    user's file to another value it was replaced without a word. A run's config.yaml records global / processes."""
    from lnfm.jobs.pretrain import load_pretrain_config

    site = tmp_path / "site.yaml"
    site.write_text("base: pelvis\ntrain: {global_batch: 2}\nloader: {batch_size: 4}\n")
    with pytest.raises(ConfigError, match=rf"^{site}: loader.batch_size 4 is not a per-process share of "
                                          r"train.global_batch \(2\), which finetuning sets it from; remove it"):
        load_finetune_config(str(site))
    site.write_text("base: pelvis\ntrain: {global_batch: 8}\nloader: {batch_size: 3}\n")
    with pytest.raises(ConfigError, match=r"loader.batch_size 3 is not a per-process share"):
        load_finetune_config(str(site))
    for share in (8, 4):  # a run's record, from one or two processes
        site.write_text(f"base: pelvis\ntrain: {{global_batch: 8}}\nloader: {{batch_size: {share}}}\n")
        assert load_finetune_config(str(site)).train.global_batch == 8
    conf = tmp_path / "pre.yaml"
    conf.write_text("base: vit_tiny\ntrain: {global_batch: 4}\ndata: {batch_size: 6}\n")
    with pytest.raises(ConfigError, match=rf"^{conf}: data.batch_size 6 is not a per-process share of "
                                          r"train.global_batch \(4\), which pretraining sets it from"):
        load_pretrain_config(str(conf))
    conf.write_text("base: vit_tiny\ntrain: {global_batch: 4}\ndata: {batch_size: 4}\n")
    assert load_pretrain_config(str(conf)).train.global_batch == 4


def test_refusals_under_init_and_a_site_file_name_the_real_cause(tmp_path):
    """An arch override against a Swin --init blamed model.window_size (the encoder's own key), and a site.patch
    override of a run's config.yaml told the user to leave unset an inference.roi the file had set."""
    model = {"arch": "swin", "size": "tiny", "window_size": [2, 2, 2], "img_size": [32, 32, 32]}
    pre = pretrain_run(tmp_path, {"model": model, "data": {"hu_window": [-175, 250], "pet_scale": 10.0}})
    with pytest.raises(ConfigError, match=r"^model.arch=vit: the --init encoder .*pre is a swin encoder and "
                                          r"finetuning keeps its architecture; drop model.arch$"):
        load_finetune_config("pelvis", ["model.arch=vit"], init=str(pre))
    assert load_finetune_config("pelvis", ["model.arch=swin"], init=str(pre)).model.arch == "swin"
    run = tmp_path / "config.yaml"  # as a finetuning run records it: the window it used
    run.write_text("base: pelvis\nsite:\n  patch: [32, 32, 32]\ninference:\n  roi: [32, 32, 32]\n")
    with pytest.raises(ConfigError, match=rf"^{run}: inference.roi \[32, 32, 32\] differs from site.patch "
                                          r"\[16, 16, 16\] \(an override\); this --site file sets inference.roi, "
                                          r".*remove inference.roi from the file$"):
        load_finetune_config(str(run), ["site.patch=[16,16,16]"])
    assert load_finetune_config(str(run)).inference.roi == (32, 32, 32)


def test_splits_hold_out_validation_without_overlap():
    recs = [{"case_id": f"c{i}", "split": "train", "label_path": "x"} for i in range(10)]
    recs += [{"case_id": "t0", "split": "test", "label_path": "x"}]
    s = make_splits(recs, 0.2)
    assert len(s.val) == 2 and not set(s.val) & set(s.pool) and s.test == ["t0"]
    assert make_splits(recs, 0.2) == s
    recs.append({"case_id": "v0", "split": "val", "label_path": "x"})
    assert make_splits(recs, 0.2).val == ["v0"]


@pytest.mark.parametrize("site", SITES)
def test_every_site_runs_a_few_steps(site, store):
    """The preset's strategy on 8 devices (mediastinum also with FSDP): two steps on real
    loader batches, finite losses, frozen parameters untouched."""
    import dataclasses

    from lnfm.data.loader import make_loader
    from lnfm.models.sharding import batch_sharding, make_mesh, use_rules

    extra = ["mesh.fsdp=2"] if site == "mediastinum" else []
    cfg = load_finetune_config(site, TINY + extra, data=[store])
    mesh = make_mesh(cfg.mesh)
    tr = build_training(cfg, 0, mesh)
    assert 0 < tr.trainable_params <= tr.total_params and tr.head_params > 0 and tr.head_flops > 0
    assert (tr.trainable_params < tr.total_params) == (cfg.strategy.freeze != "none")
    frozen0 = [np.asarray(x) for x in jax.tree.leaves(tr.state["frozen"])]
    loader_cfg = dataclasses.replace(cfg.loader, patch_size=cfg.site.patch, hu_window=cfg.site.window,
                                     batch_size=cfg.train.global_batch)
    it = iter(make_loader([store], loader_cfg, split="train", labels=True))
    state, bsh = tr.state, batch_sharding(mesh)
    with use_rules(mesh, cfg.mesh.rules):
        for _ in range(2):
            host = next(it)
            batch = {"image": jax.device_put(host["image"], bsh), "label": jax.device_put(host["label"], bsh)}
            state, metrics = tr.step_fn(state, batch)
            assert np.isfinite(float(metrics["loss"]))
    assert int(state["step"]) == 2
    for a, b in zip(frozen0, jax.tree.leaves(state["frozen"])):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_few_shot_repeats_summary_and_best_model(store, tmp_path, monkeypatch):
    from lnfm.data import store as st

    listed: list[str] = []  # a manifest read lists the store's records/ and every key under its cases/
    for name in ("_case_folder_ids", "_record_ids"):
        real = getattr(st, name)
        monkeypatch.setattr(st, name, lambda s, real=real: listed.append(s) or real(s))
    wd = tmp_path / "fs"
    cfg = load_finetune_config("pelvis", TINY + ["model.depth=1", "train.steps=4", "train.eval_every=2"], data=[store],
                               num_labeled=2, repeats=2)
    assert run(cfg, wd) == 0
    # The job reads the store once (it read it twice in its checks and again for each repeat's loader).
    assert listed == [store] * 2, listed
    s = json.loads((wd / "summary.json").read_text())
    assert len(s["repeats"]) == 2 and s["num_labeled"] == 2
    for key in KEYS:
        vals = [r[key] for r in s["repeats"] if r[key] is not None]
        if vals:
            assert s["mean"][key] == pytest.approx(np.mean(vals)) and s["std"][key] == pytest.approx(np.std(vals))
    test_ids = {c["case_id"] for c in s["cases"]}
    pools = [set(r["train_ids"]) for r in s["repeats"]]
    assert all(len(p) == 2 and not p & test_ids for p in pools)
    assert {c["repeat"] for c in s["cases"]} == {0, 1}
    assert s["site"] == "pelvis" and s["head"] == "linear" and s["strategy"] == "first_k"
    assert set(KEYS) <= set(s) and all(set(KEYS) <= set(c) for c in s["cases"])
    assert 0 < s["trainable_params"] < s["total_params"] and s["head_params"] > 0 and s["train_time_s"] > 0
    rows = [json.loads(line) for line in (wd / "repeat_0" / "metrics.jsonl").read_text().splitlines()]
    assert any("head_params" in r and "head_gflops" in r for r in rows) and any("val_dice" in r for r in rows)
    for r in range(2):
        best = RepeatRun(wd / f"repeat_{r}").best_record()  # committed inside best/<step>/ with the model
        assert best["step"] in (2, 4) and (wd / f"repeat_{r}" / "best" / str(best["step"]) / "best.json").is_file()
    # The best model rebuilds from the workdir alone and segments a volume.
    model, loaded = load_finetuned(wd)
    assert loaded.site.name == "pelvis" and loaded.head.kind == "linear"
    out = model(np.zeros((1, 16, 16, 16, 1), np.float32))
    assert out.shape == (1, 16, 16, 16, 2) and np.isfinite(np.asarray(out)).all()


def test_a_repeat_that_raises_ends_its_log(store, tmp_path, monkeypatch):
    """A repeat that fails (a bug, not a user error) keeps its traceback and closes its log.txt: the handler
    used to stay on the `lnfm` logger until the process ended, so the failed repeat's log collected every
    later run's lines in the same process."""
    import lnfm.jobs.finetune as F

    def broken_build(*a, **k):
        raise RuntimeError("a bug in building the segmenter")

    monkeypatch.setattr(F, "build_training", broken_build)
    wd = tmp_path / "fails"
    cfg = load_finetune_config("pelvis", TINY, data=[store], num_labeled=2, repeats=2)
    with pytest.raises(RuntimeError, match="a bug in building"):
        run(cfg, wd)
    assert not [h for h in logging.getLogger("lnfm").handlers if str(tmp_path) in getattr(h, "baseFilename", "")]
    logging.getLogger("lnfm.test").info("a later run's line")
    assert "repeat 0 (seed" in (wd / "repeat_0" / "log.txt").read_text()
    assert "a later run's line" not in (wd / "repeat_0" / "log.txt").read_text()
    assert "a later run's line" not in (wd / "log.txt").read_text()


def test_bad_store_is_a_one_line_error(tmp_path, capsys):
    rc = run_job("finetune", ["--site", "pelvis", "--data", str(tmp_path / "nope"), "--init", "scratch",
                              "--workdir", str(tmp_path / "wd")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "dataset not found" in err and len(err.splitlines()) == 1


def test_a_case_folder_without_its_record_is_a_one_line_refusal(tmp_path, capsys):
    """A prepare killed between a case's arrays and its record: finetuning trained and evaluated without the case,
    unsaid."""
    from lnfm.data import store as st

    store = str(tmp_path / "store")
    for cid in ("a", "b"):
        st.create_array(store, f"cases/{cid}/image_0000", np.zeros((4, 4, 4), np.int16))
    st.write_record(store, {"case_id": "a", "split": "train", "image_path": ["cases/a/image_0000"]})
    rc = run_job("finetune", ["--site", "pelvis", "--data", store, "--init", "scratch",
                              "--workdir", str(tmp_path / "wd")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"{store}: case b has arrays under cases/b/ but no records/b.json" in err
    assert not (tmp_path / "wd").exists()


@pytest.fixture(scope="module")
def sphere_store(tmp_path_factory):
    """Bright nodes (60 HU) in noisy fat (-100 HU) next to muscle-like slabs: a task a tiny model
    learns in a few hundred steps, so training must beat the untrained model by a wide margin."""
    from lnfm.data.prepare import PrepareConfig, prepare_dataset

    root = tmp_path_factory.mktemp("spheres")
    raw = root / "raw"
    write_spheres(raw, 10, seed=7)
    out = str(root / "store")
    prepare_dataset(str(raw), out, PrepareConfig(spacing=(1.5, 1.5, 1.5), workers=0, crop_body=False,
                                                 split_fractions=(0.6, 0.2, 0.2)), show_progress=False)
    return out


def test_finetuning_beats_the_untrained_model(sphere_store, tmp_path):
    base = ["site.patch=[16,16,16]", "model.img_size=[16,16,16]", "model.patch_size=[4,4,4]", "model.depth=1",
            "train.global_batch=8", "head.kind=linear", "strategy.freeze=none", "checkpoint.every=0",
            "inference.sw_batch_size=8", "inference.overlap=0.25", "optim.warmup_steps=10", "train.log_every=50"]
    untrained = load_finetune_config("pelvis", base + ["train.steps=1", "optim.lr=0", "train.eval_every=0"],
                                     data=[sphere_store])
    trained = load_finetune_config("pelvis", base + ["train.steps=200", "optim.lr=3e-3", "train.eval_every=100"],
                                   data=[sphere_store])
    assert run(untrained, tmp_path / "untrained") == 0 and run(trained, tmp_path / "trained") == 0
    before = json.loads((tmp_path / "untrained" / "summary.json").read_text())
    after = json.loads((tmp_path / "trained" / "summary.json").read_text())
    assert after["dice"] > before["dice"] + 0.2, (before["dice"], after["dice"])
    assert after["node_sensitivity"] > 0.5


def test_sigterm_saves_and_a_rerun_resumes_to_the_uninterrupted_result(store, tmp_path, monkeypatch):
    """Preemption mid-run (SIGTERM during step 3, on 8 devices with FSDP), then the same command
    again: the resumed run's losses and test metrics equal an uninterrupted run's."""
    import os
    import signal

    import lnfm.jobs.finetune as ft

    over = TINY + ["mesh.fsdp=2", "train.steps=6", "checkpoint.every=2", "train.eval_every=2"]
    cfg = load_finetune_config("pelvis", over, data=[store], num_labeled=3)

    def losses(wd):
        rows = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    assert run(cfg, tmp_path / "ref") == 0
    # the window validation and test used, as recorded (the InferenceConfig default is 96^3)
    assert yaml.safe_load((tmp_path / "ref" / "config.yaml").read_text())["inference"]["roi"] == [16, 16, 16]
    real = ft.make_train_step

    def preempting(*args, **kwargs):
        step, calls = real(*args, **kwargs), [0]

        def wrapped(state, batch):
            calls[0] += 1
            if calls[0] == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # the loop finishes this step, saves and returns
            return step(state, batch)

        return wrapped

    monkeypatch.setattr(ft, "make_train_step", preempting)
    wd = tmp_path / "run"
    assert run(cfg, wd) == 0
    assert not (wd / "summary.json").exists() and max(losses(wd)) == 3
    monkeypatch.setattr(ft, "make_train_step", real)
    assert run(cfg, wd) == 0
    assert "resumed from step 3" in (wd / "log.txt").read_text()
    ref, got = losses(tmp_path / "ref"), losses(wd)
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    np.testing.assert_allclose([got[s] for s in range(1, 7)], [ref[s] for s in range(1, 7)], rtol=1e-6)
    a, b = (json.loads((d / "summary.json").read_text()) for d in (tmp_path / "ref", wd))
    for key in KEYS:  # None where a metric is undefined (no predicted node in 6 steps)
        assert (a[key] is None and b[key] is None) or a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
    assert a["best_step"] == b["best_step"]


def test_finetune_schedule_ends_at_a_floor_not_zero():
    """Few-shot validation Dice still rises late in a run: the default cosine stops at 10% of the peak."""
    from lnfm.train.optim import make_schedule, peak_lr

    cfg = load_finetune_config("pelvis")
    sched = make_schedule(cfg.optim, cfg.train.steps, cfg.train.global_batch)
    peak = peak_lr(cfg.optim, cfg.train.global_batch)
    assert float(sched(cfg.train.steps)) == pytest.approx(0.1 * peak, rel=1e-4)
    assert float(sched(cfg.train.steps // 2 + cfg.optim.warmup_steps // 2)) == pytest.approx(0.55 * peak, rel=1e-2)


# ----------------------------------------------------------------------------- nothing lost


def test_workdir_apart_from_init_and_data_and_a_refused_resume_writes_nothing(tmp_path, capsys):
    from tree_helpers import tree_digest

    from lnfm.workdir import open_workdir

    pre = tmp_path / "pre"
    (pre / "checkpoints" / "5").mkdir(parents=True)
    (pre / "config.yaml").write_text(yaml.safe_dump({"model": {"arch": "vit", "size": "tiny", "width": 48}}))
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.jsonl").write_text("")
    wd = tmp_path / "ft"
    cfg = load_finetune_config("pelvis", TINY, data=[str(store)])
    open_workdir(wd, cfg).close()
    (wd / "checkpoints" / "2").mkdir(parents=True)  # a run to resume
    base = ["--site", "pelvis", "--data", str(store)]
    cases = {
        "workdir_is_init": (base + ["--init", str(pre), "--workdir", str(pre)], "--workdir is --init"),
        "workdir_in_init": (base + ["--init", str(pre), "--workdir", str(pre / "ft")], "--workdir lies inside --init"),
        "workdir_in_data": (base + ["--init", "scratch", "--workdir", str(store / "ft")],
                            "--workdir lies inside --data"),
        "another_head": (base + ["--init", "scratch", "--workdir", str(wd), *once(TINY, ["head.kind=light"])],
                         'head.kind="linear" (new: "light")'),
        "another_model": (base + ["--init", "scratch", "--workdir", str(wd), *once(TINY, ["model.depth=3"])],
                          "model.depth=2 (new: 3)"),
    }
    before = tree_digest(tmp_path)
    for name, (args, reason) in cases.items():
        capsys.readouterr()
        rc = run_job("finetune", args)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and reason in err[0], (name, err)
        assert tree_digest(tmp_path) == before, name  # config.yaml of the refused resume included


def test_a_resume_that_changes_how_the_run_trains_is_refused_and_writes_nothing(store, tmp_path, capsys):
    """A 2-step run resumed with another learning rate, loss or global batch would mix two runs in one
    set of checkpoints under a config.yaml naming only the second: one line, nothing written (the record
    included). More steps and another checkpoint interval resume."""
    from tree_helpers import tree_digest

    wd = tmp_path / "ft"
    options = ["--site", "pelvis", "--data", store, "--init", "scratch", "--workdir", str(wd), "--num-labeled", "3"]
    over = once(TINY, ["checkpoint.every=2"])
    base = options + over
    assert run_job("finetune", base) == 0
    recorded = yaml.safe_load((wd / "config.yaml").read_text())
    before = tree_digest(wd)
    for extra, key in [(["optim.lr=0.5"], "optim.lr"), (["loss.name=tversky"], "loss.name"),
                       (["train.global_batch=16"], "train.global_batch"), (["loader.flips=false"], "loader.flips")]:
        section, name = key.split(".")
        old = json.dumps(recorded[section][name])
        new = json.dumps(yaml.safe_load(extra[0].split("=", 1)[1]))
        capsys.readouterr()
        assert run_job("finetune", options + once(over, extra)) == 2, extra
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"lnfm finetune: error: {wd / 'config.yaml'}: the run to resume has {key}={old} (new: {new}); "
                       f"a resumed run may change only train.steps, train.log_every, train.image_every, "
                       f"train.profile_steps, train.eval_every, train.accum_steps, checkpoint, mesh, model.remat: "
                       f"resume with the same settings or choose a new --workdir"], extra
        assert tree_digest(wd) == before, extra
    assert run_job("finetune", options + once(over, ["train.steps=4", "checkpoint.every=1"])) == 0
    assert "resumed from step 2" in (wd / "log.txt").read_text()
    assert yaml.safe_load((wd / "config.yaml").read_text())["train"]["steps"] == 4


def test_a_resume_over_a_store_that_gained_cases_is_refused(store, tmp_path, capsys):
    """The splits were recomputed at every start: cases added to the store since moved a validation case into
    training and changed the validation set best.json compares over, and the run resumed with exit 0. The run
    records its splits at the first start; a resume over other splits is one line, nothing written."""
    import shutil

    from tree_helpers import tree_digest

    from lnfm.data.prepare import PrepareConfig, prepare_dataset
    from lnfm.data.store import read_manifest

    data = shutil.copytree(store, tmp_path / "store")
    wd = tmp_path / "ft"
    options = ["--site", "pelvis", "--data", str(data), "--init", "scratch", "--workdir", str(wd), "--num-labeled", "3"]
    over = once(TINY, ["checkpoint.every=2"])
    base = options + over
    assert run_job("finetune", base) == 0
    splits = json.loads((wd / "splits.json").read_text())
    expected = make_splits(read_manifest(str(data)), 0.15)
    assert (splits["train"], splits["val"], splits["test"]) == (expected.pool, expected.val, expected.test)
    from lnfm.data.synth import SynthConfig, write_dataset

    write_dataset(SynthConfig(site="pelvis", num_cases=3, seed=2, shape=(40, 40, 24), gallery=False,
                              use_real_shapes=False, spacing_inplane=(1.4, 1.6), slice_thickness=(1.5, 1.5),
                              nodes_per_case=(2, 3), short_axis_mm=(8.0, 12.0)), tmp_path / "raw")
    raw = tmp_path / "raw" / "imagesTr"  # new phantoms under new ids
    rows = "".join(f"extra_{i},{p},{str(p).replace('imagesTr', 'labelsTr').replace('_0000', '')}\n"
                   for i, p in enumerate(sorted(raw.glob("*_0000.nii.gz"))[:3]))
    (tmp_path / "more.csv").write_text("case_id,image,label\n" + rows)
    prepare_dataset(str(tmp_path / "more.csv"), str(data), PrepareConfig(spacing=(1.5, 1.5, 1.5), workers=0,
                                                                         split_fractions=(0.6, 0.0, 0.4)),
                    show_progress=False)
    before = tree_digest(wd)
    capsys.readouterr()
    assert run_job("finetune", options + once(over, ["train.steps=4"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lnfm finetune: error: {wd / 'splits.json'}: the run to resume "
                                               f"recorded other splits (") and "its data changed since" in err[0]
    assert tree_digest(wd) == before


def test_a_resume_over_a_store_prepared_again_with_other_labels_under_the_same_ids_is_refused(tmp_path, capsys):
    """The store removed and prepared again in place from corrected labels, under the same case ids and splits:
    splits.json (ids only) matched and the run resumed on the new labels (rc 0). The run records each case's
    content fingerprint (content.json); a changed case is refused in one line naming the store and the case,
    nothing written."""
    import shutil

    import nibabel as nib
    from scipy import ndimage
    from tree_helpers import tree_digest

    from lnfm.data.prepare import PrepareConfig, prepare_dataset
    from lnfm.data.synth import SynthConfig, write_dataset

    write_dataset(SynthConfig(site="pelvis", num_cases=8, seed=1, shape=(40, 40, 24), gallery=False,
                              use_real_shapes=False, spacing_inplane=(1.4, 1.6), slice_thickness=(1.5, 1.5),
                              nodes_per_case=(2, 3), short_axis_mm=(8.0, 12.0)), tmp_path / "raw")
    data, wd = str(tmp_path / "store"), tmp_path / "ft"
    prep = PrepareConfig(spacing=(1.5, 1.5, 1.5), workers=0, split_fractions=(0.6, 0.0, 0.4))
    assert prepare_dataset(str(tmp_path / "raw"), data, prep, show_progress=False).ok
    base = ["--site", "pelvis", "--data", data, "--init", "scratch", "--workdir", str(wd)]
    assert run_job("finetune", base + once(TINY, ["checkpoint.every=2"])) == 0
    splits = (wd / "splits.json").read_bytes()
    labels = sorted((tmp_path / "raw" / "labelsTr").glob("*.nii.gz"))
    for path in labels[:2]:  # corrected labels: each node a voxel wider
        img = nib.load(path)
        lab = np.asarray(img.dataobj).copy()
        lab[ndimage.binary_dilation(lab > 0) & (lab == 0)] = 1
        nib.save(nib.Nifti1Image(lab, img.affine, img.header), path)
    shutil.rmtree(data)
    assert prepare_dataset(str(tmp_path / "raw"), data, prep, show_progress=False).ok
    before = tree_digest(wd)
    capsys.readouterr()
    assert run_job("finetune", base + once(TINY, ["checkpoint.every=2", "train.steps=4"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    first = labels[0].name.removesuffix(".nii.gz")
    assert err == [f"lnfm finetune: error: {wd / 'content.json'}: the run to resume recorded other content for case "
                   f"{first} (and 1 more) of {data} (prepared again since, from other images or labels): its data "
                   f"changed since it started; resume with the data it had, or choose a new --workdir"], err
    assert tree_digest(wd) == before and (wd / "splits.json").read_bytes() == splits


def test_a_second_job_on_the_workdir_is_refused_naming_the_holder(tmp_path, capsys):
    import os
    import subprocess
    import sys

    hold = ("import sys, time; from lnfm.workdir import lock_folder\n"
            "with lock_folder(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path / "wd")], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    try:
        assert proc.stdout.readline().strip() == "locked"
        rc = run_job("finetune", ["--site", "pelvis", "--data", str(tmp_path / "nope"), "--init", "scratch",
                                  "--workdir", str(tmp_path / "wd")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and f"in use by another lnfm job (pid {proc.pid} on" in err[0]
    finally:
        proc.kill()
        proc.wait()


def test_a_workdir_moved_while_the_run_trains_ends_it_in_one_line_keeping_its_checkpoints(store, tmp_path, monkeypatch,
                                                                                          capsys):
    """The user renames a running finetune's workdir once its step-2 checkpoint is committed: the job ended with
    TensorStore's NOT_FOUND or a FileNotFoundError traceback (and Orbax recreated the folder at the old path). Now
    one line naming the folder; the moved run keeps its checkpoint, and nothing is left at the old path."""
    import os
    import time

    import lnfm.jobs.finetune as ft
    from lnfm.train.checkpoint import committed_steps, verify_checksums

    wd, moved = tmp_path / "ft", tmp_path / "moved"
    real = ft.make_train_step

    def moving(*args, **kwargs):
        step, calls = real(*args, **kwargs), [0]

        def wrapped(state, batch):
            calls[0] += 1
            if calls[0] == 3:  # step 3: the user moves the folder once step 2's async save is committed
                deadline = time.time() + 60
                while not (wd / "checkpoints" / "2").is_dir() and time.time() < deadline:
                    time.sleep(0.05)
                os.rename(wd, moved)
            return step(state, batch)

        return wrapped

    def argv(workdir):
        return ["--site", "pelvis", "--data", store, "--init", "scratch", "--workdir", str(workdir), "--num-labeled",
                "3", *once(TINY, ["checkpoint.every=2", "train.steps=4"])]

    monkeypatch.setattr(ft, "make_train_step", moving)
    capsys.readouterr()
    rc = run_job("finetune", argv(wd))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not any("Traceback" in line for line in err), err
    assert err[-1].startswith(f"lnfm finetune: error: {wd}") and "moved, renamed or removed while the job" in err[-1]
    assert not wd.exists()
    assert committed_steps(moved / "checkpoints") == [2] and verify_checksums(moved / "checkpoints" / "2")
    monkeypatch.setattr(ft, "make_train_step", real)
    assert run_job("finetune", argv(moved)) == 0  # as the line says: the moved run resumes
    assert "resumed from step 2" in (moved / "log.txt").read_text() and (moved / "summary.json").is_file()


def test_a_workdir_moved_during_a_checkpoint_save_keeps_that_checkpoint(store, tmp_path, monkeypatch, capsys):
    """The user moves a running finetune's workdir while its step-4 checkpoint is saved in the background (here,
    as the save writes its checksum list, before its commit). That step was lost without a word; now it commits
    where the folder went, the job ends in one line, and the moved run resumes from step 4."""
    import os

    import lnfm.train.checkpoint as ckpt
    from lnfm.train.checkpoint import committed_steps

    wd, moved = tmp_path / "ft", tmp_path / "moved"
    real = ckpt.write_checksums

    def moving(folder):
        if Path(folder).name.startswith("4.") and wd.exists():
            os.rename(wd, moved)
        real(folder)

    argv = ["--site", "pelvis", "--data", store, "--init", "scratch", "--workdir", str(wd), "--num-labeled", "3",
            *once(TINY, ["checkpoint.every=2", "train.steps=4"])]
    monkeypatch.setattr(ckpt, "write_checksums", moving)
    capsys.readouterr()
    rc = run_job("finetune", argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not any("Traceback" in line for line in err), err
    assert err[-1].startswith(f"lnfm finetune: error: {wd}") and "moved, renamed or removed while the job" in err[-1]
    assert not wd.exists() and committed_steps(moved / "checkpoints") == [2, 4]
    monkeypatch.setattr(ckpt, "write_checksums", real)
    argv[argv.index(str(wd))] = str(moved)
    assert run_job("finetune", argv) == 0 and "resumed from step 4" in (moved / "log.txt").read_text()


@pytest.mark.parametrize("moment", ["tuned_postprocess", "combine"])
def test_a_workdir_moved_as_the_run_ends_is_not_remade_at_the_old_path(store, tmp_path, monkeypatch, capsys, moment):
    """The user moves a finetune's workdir once training is over: before the repeat's postprocess.json and test
    masks (tuned_postprocess), or before summary.json (combine). Those writes made the folders they needed and
    remade the workdir at the old path with the one file; now the job ends in one line naming the folder, and the
    moved run resumes to its summary."""
    import os

    import lnfm.jobs.finetune as ft

    wd, moved = tmp_path / "ft", tmp_path / "moved"
    real = getattr(ft, moment)

    def moving(*args, **kwargs):
        os.rename(wd, moved)
        return real(*args, **kwargs)

    argv = ["--site", "pelvis", "--data", store, "--init", "scratch", "--workdir", str(wd), "--num-labeled", "3",
            *TINY]
    monkeypatch.setattr(ft, moment, moving)
    capsys.readouterr()
    rc = run_job("finetune", argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not any("Traceback" in line for line in err), err
    assert err[-1].startswith(f"lnfm finetune: error: {wd}") and "moved, renamed or removed while the job" in err[-1]
    assert not wd.exists()
    monkeypatch.setattr(ft, moment, real)
    argv[argv.index(str(wd))] = str(moved)
    assert run_job("finetune", argv) == 0 and (moved / "summary.json").is_file()


_SAVE_BEST = """
import sys
import numpy as np
from lnfm.jobs.finetune import save_best
from lnfm.train.checkpoint import CheckpointConfig, Checkpointer
step = int(sys.argv[2])
ck = Checkpointer(sys.argv[1], CheckpointConfig(keep=1, async_save=False))
weights = np.random.default_rng(step).standard_normal(50_000).astype(np.float32)  # incompressible
save_best(ck, step, {"model": {"w": weights}}, {"note": "x"}, {"step": step, "val_dice": 0.5})
ck.close()
"""


def test_a_full_disk_while_saving_the_best_model_keeps_the_previous_best(tmp_path):
    """`ulimit -f` in a real process: the new best cannot be written; the previous best is still
    there and restores with its checksums verified; the rerun replaces it."""
    import os
    import resource
    import subprocess
    import sys

    from lnfm.train.checkpoint import CheckpointConfig, Checkpointer, verify_checksums

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": ""}
    best = tmp_path / "best"

    def run(step, limit=None):
        pre = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))) if limit else None
        return subprocess.run([sys.executable, "-c", _SAVE_BEST, str(best), str(step)],
                              capture_output=True, text=True, timeout=120, env=env, preexec_fn=pre)

    assert run(2).returncode == 0
    assert run(4, limit=16_384).returncode != 0  # the 200 kB array does not fit
    target = {"model": {"w": jax.ShapeDtypeStruct((50_000,), np.float32,
                                                  sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}}

    def restored():
        assert verify_checksums(best / str(sorted(int(p.name) for p in best.iterdir() if p.name.isdigit())[-1]))
        with Checkpointer(best, CheckpointConfig(keep=1, async_save=False)) as ck:
            state, step = ck.restore_latest(target)
        np.testing.assert_array_equal(state["model"]["w"], np.random.default_rng(step).standard_normal(50_000)
                                      .astype(np.float32))
        return step

    assert restored() == 2
    assert run(4).returncode == 0
    assert restored() == 4 and sorted(p.name for p in best.iterdir() if p.name.isdigit()) == ["4"]


def test_lora_run_exports_the_adapters_folded_into_the_kernels(store, tmp_path):
    """Export reads a LoRA run without the finetune job: its params equal the job's own rebuild
    (load_finetuned) with the adapters merged by merge_lora."""
    from lnfm.jobs.export import export_model, load_export
    from lnfm.models import export_formats as fmt
    from lnfm.models.lora import merge_lora

    wd = tmp_path / "lora"
    cfg = load_finetune_config("pelvis", TINY + ["model.depth=1", "train.steps=2", "train.eval_every=2",
                                                 "strategy.freeze=lora", "strategy.lora_rank=2"],
                               data=[store], num_labeled=2)
    assert run(cfg, wd) == 0
    model, _ = load_finetuned(wd)
    merge_lora(model.encoder)
    want = fmt.flat_params(model)
    got = fmt.flat_params(load_export(export_model(wd, tmp_path / "export", "safetensors")).model)
    assert set(got) == set(want) and not any("lora" in k for k in got)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("user", [{}, {"min_short_axis_mm": 6.0, "max_elongation": 2.5}],
                         ids=["default", "prior_in_the_config"])
def test_size_prior_is_tuned_on_the_validation_cases_only(user):
    """A predicted node plus a 1-voxel-wide vessel-like streak and a 2x3x3 speck: the tuned prior
    removes both (validation Dice 1.0, hand-computed), and nothing is tuned when asked not to.
    A prior already in the config must not filter the predictions tuned on: all settings would then
    tie at 1.0 and the mildest, none at all, would be exported."""
    from lnfm.eval.predictor import Predictor
    from lnfm.jobs.finetune import Case, tuned_postprocess

    grid = np.indices((40, 40, 40))
    node = ((grid - 12) ** 2).sum(0) <= 16  # radius 4 voxels at 1 mm: an 8 mm node
    pred = node.copy()
    pred[30, 5:35, 30] = True  # 30 mm long, 1 mm wide: a vessel, not a node
    pred[2:4, 30:33, 2:5] = True  # a 2 mm thick speck of 18 mm^3, over the site's 10 mm^3 minimum volume
    # The image's one channel is the prediction; the model's node probability is that channel.
    case = Case("v0", pred.astype(np.float32)[..., None], node.astype(np.int32), (1.0, 1.0, 1.0), None, np.eye(4))
    cfg = load_finetune_config("pelvis")
    cfg = dataclasses.replace(cfg, postprocess=dataclasses.replace(cfg.postprocess, **user))  # as a --site file may
    predictor = Predictor(lambda x: np.concatenate([1.0 - x, x], -1), (40, 40, 40), 2, cfg.inference,
                          cfg.postprocess)
    post = tuned_postprocess(cfg, predictor, [case])
    assert post.min_short_axis_mm >= 3.0  # both extras have a minor diameter of about 1-2 mm
    from lnfm.eval.postprocess import apply_size_prior
    from lnfm.eval.surface import dice
    assert dice(apply_size_prior(pred, (1, 1, 1), post.min_short_axis_mm, post.max_elongation), node) == 1.0
    assert post.min_volume_mm3 == cfg.postprocess.min_volume_mm3  # the rest of the config is kept
    off = dataclasses.replace(cfg, tune_postprocess=False)
    assert tuned_postprocess(off, predictor, [case]) == cfg.postprocess
    assert tuned_postprocess(cfg, predictor, []) == cfg.postprocess  # no validation cases: nothing to tune on


def test_ema_decay_validates_keeps_and_exports_the_moving_average(store, tmp_path):
    """With optim.ema_decay the raw training is unchanged (same losses), and the best model is the
    moving average of the raw parameters of every step, computed here from the run's own checkpoints
    with the ramped decay min(d, (1 + n) / (10 + n))."""
    from flax import nnx

    from lnfm.models.sharding import make_mesh
    from lnfm.train.checkpoint import restore_params

    over = TINY + ["model.depth=1", "train.steps=4", "train.eval_every=4", "checkpoint.every=1", "checkpoint.keep=5"]
    plain = load_finetune_config("pelvis", over, data=[store], num_labeled=3)
    cfg = load_finetune_config("pelvis", over + ["optim.ema_decay=0.5"], data=[store], num_labeled=3)
    assert run(plain, tmp_path / "plain") == 0 and run(cfg, tmp_path / "ema") == 0

    def losses(wd):
        return [json.loads(r)["loss"] for r in (wd / "metrics.jsonl").read_text().splitlines() if '"loss"' in r]

    np.testing.assert_allclose(losses(tmp_path / "ema"), losses(tmp_path / "plain"), rtol=1e-6)
    initial = build_training(cfg, cfg.train.seed, make_mesh(cfg.mesh)).state["params"]
    ckpts = RepeatRun(tmp_path / "ema").checkpoints
    expect = nnx.to_pure_dict(jax.tree.map(lambda x: np.asarray(x, np.float64), initial))
    for n in range(4):
        raw = nnx.to_pure_dict(restore_params(ckpts, initial, step=n + 1))
        d = min(0.5, (1 + n) / (10 + n))
        expect = jax.tree.map(lambda e, p: d * e + (1 - d) * np.asarray(p), expect, raw)
    got = {jax.tree_util.keystr(k): np.asarray(v) for k, v in
           jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(load_finetuned(tmp_path / "ema")[0])))}
    raw_last = {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(raw)}
    flat = jax.tree_util.tree_leaves_with_path(expect)
    assert flat and all(jax.tree_util.keystr(k) in got for k, _ in flat)
    for path, v in flat:
        k = jax.tree_util.keystr(path)
        np.testing.assert_allclose(got[k], v, rtol=1e-5, atol=1e-6, err_msg=k)
    assert any(not np.allclose(got[k], raw_last[k]) for k in raw_last)  # the average, not the last weights


def test_ema_decay_outside_0_1_is_refused_before_anything_is_written(store):
    with pytest.raises(ConfigError, match="ema_decay"):
        load_finetune_config("pelvis", TINY + ["optim.ema_decay=1.0"], data=[store])


@pytest.mark.parametrize("options, override, key, flag", [
    ({"repeats": 1}, "train.repeats=3", "train.repeats", "--repeats"),
    ({"num_labeled": 2}, "train.num_labeled=4", "train.num_labeled", "--num-labeled"),
    ({}, 'data=["other"]', "data", "--data"),
])
def test_an_option_and_an_override_of_one_key_are_refused(options, override, key, flag):
    """The options were applied after the overrides: --repeats 1 train.repeats=3 ran one repeat, without a word."""
    with pytest.raises(ConfigError, match=rf"^{key}: set by {flag}; give it there, not as an override as well$"):
        load_finetune_config("pelvis", [override], data=["store"], **options)
    if options:  # the override alone is taken
        cfg = load_finetune_config("pelvis", [override], data=["store"])
        assert getattr(cfg.train, key.split(".")[1]) == int(override.split("=")[1])


@pytest.fixture(scope="module")
def two_step_run(store, tmp_path_factory):
    """A finished 2-step finetuning run and `argv(workdir, *overrides)`, the command that made it; tests resume
    copies of it."""
    def argv(wd, *extra):
        return ["--site", "pelvis", "--data", store, "--init", "scratch", "--workdir", str(wd), "--num-labeled", "3",
                *once(TINY, ["checkpoint.every=2"], extra)]

    wd = tmp_path_factory.mktemp("two_steps") / "ft"
    assert run_job("finetune", argv(wd)) == 0
    return wd, argv


def _copy_run(two_step_run, tmp_path):
    import shutil

    wd, argv = two_step_run
    return shutil.copytree(wd, tmp_path / "ft"), argv


def test_a_resume_with_fewer_steps_than_the_run_reached_is_refused_and_writes_nothing(two_step_run, tmp_path,
                                                                                        capsys):
    """It restored step 2, trained nothing, tested again and exited 0 with config.yaml saying train.steps=1: one
    line now, nothing written."""
    from tree_helpers import tree_digest

    wd, argv = _copy_run(two_step_run, tmp_path)
    before = tree_digest(wd)
    capsys.readouterr()
    assert run_job("finetune", argv(wd, "train.steps=1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"lnfm finetune: error: {wd}: the run to resume has reached step 2, beyond train.steps=1; a "
                   f"resumed run may lengthen a run, not shorten it: give train.steps=2 or more, or choose a new "
                   f"--workdir"], err
    assert tree_digest(wd) == before


def test_a_failed_restore_leaves_config_yaml_as_it_was(two_step_run, tmp_path, capsys):
    """A resume with more steps whose checkpoint fails to restore (here: corrupt) stops in one line; it had
    rewritten config.yaml with the new train.steps first, for a run that never resumed."""
    wd, argv = _copy_run(two_step_run, tmp_path)
    for step in (p for p in (wd / "checkpoints").iterdir() if p.name.isdigit()):
        (step / "state" / "_METADATA").write_text("garbage")
    config = (wd / "config.yaml").read_bytes()
    capsys.readouterr()
    assert run_job("finetune", argv(wd, "train.steps=4")) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if "error:" in line]
    assert len(err) == 1 and "checkpoints: no checkpoint could be restored" in err[0], err
    assert (wd / "config.yaml").read_bytes() == config


def test_a_failed_restore_in_the_multi_repeat_path_leaves_the_earlier_config_yaml(two_step_run, tmp_path, capsys):
    """Two repeats, resumed with more steps. Repeat 0's checkpoints corrupt: it fails before anything trained, and
    no config.yaml changes (the run's, repeat_0's, repeat_1's). Repeat 1's corrupt: repeat 0 resumed and trained
    under the new config (the run's and its config.yaml say so), repeat 1 failed and its config.yaml is as it was."""
    import shutil

    _, argv = two_step_run
    finished = tmp_path / "finished"
    assert run_job("finetune", argv(finished, "train.repeats=2")) == 0
    for bad in (0, 1):
        wd = shutil.copytree(finished, tmp_path / f"bad{bad}")
        for step in (p for p in (wd / f"repeat_{bad}" / "checkpoints").iterdir() if p.name.isdigit()):
            (step / "state" / "_METADATA").write_text("garbage")
        paths = [wd / "config.yaml", *(wd / f"repeat_{r}" / "config.yaml" for r in (0, 1))]
        before = {p: p.read_bytes() for p in paths}
        capsys.readouterr()
        assert run_job("finetune", argv(wd, "train.repeats=2", "train.steps=4")) == 2
        err = [line for line in capsys.readouterr().err.strip().splitlines() if "error:" in line]
        assert len(err) == 1 and f"repeat_{bad}/checkpoints: no checkpoint could be restored" in err[0], err
        for p in paths:
            resumed = bad == 1 and p != wd / "repeat_1" / "config.yaml"
            assert ("steps: 4" in p.read_text()) == resumed and (p.read_bytes() == before[p]) != resumed, (bad, p)


def test_a_head_option_the_head_does_not_take_is_one_line_naming_its_options():
    """head.options went to the head's constructor unchecked: a TypeError traceback."""
    with pytest.raises(ConfigError, match=r"^head.options: the fine head takes no option 'bogus' \(its options: "
                                          r"widths, conv_levels, top_kernel, convs_per_level\)$"):
        load_finetune_config("pelvis", ["head.kind=fine", "head.options={bogus: 3}"])
    cfg = load_finetune_config("pelvis", ["head.kind=fine", "head.options={conv_levels: 2}"])
    assert cfg.head.options == {"conv_levels": 2}


def test_a_mapping_given_to_head_options_replaces_it_and_a_section_still_merges(tmp_path):
    """head.options is a value (the head's keyword arguments), not a section, yet since sections merge (I14) a
    mapping merged into it: "head.options={}" could not clear a file's options, nor a file over its base the base's
    options for another head (which check_head then refused). A mapping replaces a dict-valued field, on the command
    line and in a file over its base; a section given as a mapping still keeps its other keys."""
    unetr = tmp_path / "unetr.yaml"
    unetr.write_text("base: pelvis\nhead: {kind: unetr, options: {feature_size: 8}}\n")
    assert load_finetune_config(str(unetr), ["head.options={}"]).head.options == {}
    head = load_finetune_config(str(unetr), ["head={options: {num_aux: 1}}"]).head
    assert (head.kind, head.options) == ("unetr", {"num_aux": 1})
    assert load_finetune_config(str(unetr), ["head.options.num_aux=1"]).head.options == {"feature_size": 8,
                                                                                        "num_aux": 1}
    fine = tmp_path / "fine.yaml"
    fine.write_text(f"base: {unetr}\nhead: {{kind: fine, options: {{conv_levels: 2}}}}\n")
    assert load_finetune_config(str(fine)).head.options == {"conv_levels": 2}
    # replaced whole, it is one key: with a key inside it as well, one of them would be lost without a word
    with pytest.raises(ConfigError, match=r"^head.options: given whole and as head.options.num_aux among the "
                                          r"overrides; give it once$"):
        parse_args(["--site", str(unetr), "--data", "x", "--init", "scratch", "--workdir", "w",
                    "head.options.num_aux=1", "head.options={}"])


def test_a_patch_that_is_no_whole_number_of_tokens_is_refused_before_anything_is_written(store, tmp_path, capsys):
    """site.patch=[12,16,16] with 8-voxel tokens failed in a reshape, after the workdir was written."""
    wd = tmp_path / "wd"
    rc = run_job("finetune", ["--site", "pelvis", "--data", store, "--init", "scratch", "--workdir", str(wd),
                              *once(TINY, ["site.patch=[12,16,16]"])])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert ("site.patch [12, 16, 16] is not a whole number of the encoder's deepest stride [8, 8, 8]" in err
            and "e.g. [16, 16, 16]" in err)
    assert not wd.exists()


def test_init_from_a_pretraining_run_without_a_checkpoint_is_refused_before_anything_is_written(store, tmp_path,
                                                                                                capsys):
    """A pretraining run killed before its first save was taken as an --init: FileNotFoundError traceback at the
    restore, after the workdir was written."""
    model = {"arch": "vit", "size": "tiny", "depth": 2, "patch_size": [8, 8, 8], "img_size": [16, 16, 16]}
    pre = pretrain_run(tmp_path, {"model": model, "data": {"hu_window": [-900, 900], "pet_scale": 5.0}})
    wd = tmp_path / "wd"
    rc = run_job("finetune", ["--site", "pelvis", "--data", store, "--init", str(pre), "--workdir", str(wd),
                              *TINY])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert f"{pre}: the pretraining run has no saved checkpoint" in err
def test_a_scratch_model_in_channels_that_contradicts_the_store_is_refused(store, tmp_path, capsys):
    """A scratch encoder takes the data's channels; a model.in_channels naming others was silently replaced."""
    wd = tmp_path / "ft"
    rc = run_job("finetune", ["--site", "pelvis", "--data", store, "--init", "scratch", "--workdir", str(wd),
                              *once(TINY, ["model.in_channels=2"])])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "the data has 1 channel(s) but model.in_channels (leave it unset to take the data's) takes 2" in err[0]
    assert not wd.exists()


def test_init_from_a_damaged_pretraining_step_is_refused_before_anything_is_written(store, tmp_path, capsys):
    """An older lnfm's step (no checksum list) with a file cut short failed the restore in one line, but after the
    finetuning workdir was written: the check reads it back first (a step whose checksum list fails, too). A whole
    one of the same run still trains."""
    import shutil

    from flax import nnx

    from lnfm.models.segmenter import segmenter_from_config
    from lnfm.train.checkpoint import CHECKSUMS, CheckpointConfig, Checkpointer

    model = {"arch": "vit", "size": "tiny", "depth": 2, "patch_size": [8, 8, 8], "img_size": [16, 16, 16]}
    pre = pretrain_run(tmp_path, {"model": model, "data": {"hu_window": [-900, 900], "pet_scale": 5.0}})
    cfg = load_finetune_config("pelvis", TINY, init=str(pre))
    encoder = nnx.state(segmenter_from_config(cfg.model, cfg.head, 2, nnx.Rngs(0)).encoder, nnx.Param)
    ckpt = Checkpointer(pre / "checkpoints", CheckpointConfig(keep=3, async_save=False))
    for step in (1, 2, 3):
        ckpt.save(step, {"params": nnx.State({"encoder": encoder})})
    ckpt.close()
    for step in (1, 2):
        (pre / "checkpoints" / str(step) / CHECKSUMS).unlink()  # as an older lnfm saved it
    for data in (f for f in (pre / "checkpoints" / "2" / "state").rglob("*") if f.is_file() and f.parent.name == "d"):
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # the arrays' data files, cut short
    flipped = next(f for f in (pre / "checkpoints" / "3" / "state").rglob("*") if f.is_file() and f.parent.name == "d")
    flipped.write_bytes(bytes([flipped.read_bytes()[0] ^ 0xFF]) + flipped.read_bytes()[1:])
    wd = tmp_path / "wd"
    for says in (f"{flipped}: checksum mismatch",
                 f"{pre / 'checkpoints'}: checkpoint step 2 cannot be read (a file of it is damaged, truncated or "
                 f"missing); it has no {CHECKSUMS}"):
        rc = run_job("finetune", ["--site", "pelvis", "--data", store, "--init", str(pre), "--workdir", str(wd),
                                  *TINY])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and says in err, err
        assert not wd.exists()
        shutil.rmtree(pre / "checkpoints" / ("3" if "mismatch" in says else "2"))  # the newest step next: whole
    assert run_job("finetune", ["--site", "pelvis", "--data", store, "--init", str(pre), "--workdir", str(wd),
                                *TINY]) == 0
