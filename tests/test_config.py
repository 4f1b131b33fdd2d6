"""The typed config loader: YAML presets, overrides, unknown-key errors."""

import dataclasses

import pytest

from lnfm import config as C


@dataclasses.dataclass
class Opt:
    lr: float = 1e-3  # learning rate
    betas: tuple[float, float] = (0.9, 0.95)


@dataclasses.dataclass
class Job:
    name: str = "job"
    steps: int = 10
    patch: tuple[int, int, int] = (96, 96, 96)
    stores: list[str] = dataclasses.field(default_factory=list)
    mode: str | None = None
    flag: bool = False
    opt: Opt = dataclasses.field(default_factory=Opt)


def test_overrides_are_typed_and_nested():
    cfg = C.load_config(Job, None, ["steps=5", "opt.lr=3e-4", "patch=32,32,16", "flag=true", "stores=[a,b]"])
    assert cfg.steps == 5 and isinstance(cfg.steps, int)
    assert cfg.opt.lr == pytest.approx(3e-4) and cfg.opt.betas == (0.9, 0.95)
    assert cfg.patch == (32, 32, 16)
    assert cfg.flag is True and cfg.stores == ["a", "b"]


def test_an_override_given_twice_on_a_command_line_is_refused():
    """The last one won without a word (`train.steps=1 ... train.steps=2` trained 2 steps)."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--site")
    ap.add_argument("overrides", nargs="*")
    with pytest.raises(C.ConfigError, match=r"^opt\.lr: given twice as an override; give it once$"):
        C.parse_args_once(ap, ["opt.lr=1", "steps=3", "opt.lr=2"])
    assert C.parse_args_once(ap, ["--site", "x", "opt.lr=1", "opt.betas=[0.8,0.9]"]).overrides[0] == "opt.lr=1"
    for twice in (["opt={lr: 1}", "opt={lr: 2}"], ["opt.lr=1", "opt={lr: 2}"]):  # a mapping sets its keys
        with pytest.raises(C.ConfigError, match=r"^opt\.lr: given twice as an override"):
            C.check_unique_overrides(twice)
    C.check_unique_overrides(["opt={lr: 1}", "opt={betas: [0.8, 0.9]}"])  # two keys of one section


def test_unknown_key_names_closest():
    # the suggestion is the key as it is typed, section and all (plan said 'qkv_bias' for model.bogus)
    with pytest.raises(C.ConfigError, match=r"^unknown config key 'opt\.lrr'; did you mean 'opt\.lr'\?$"):
        C.load_config(Job, None, ["opt.lrr=1"])
    with pytest.raises(C.ConfigError, match=r"^unknown config key 'stpes'; did you mean 'steps'\?$"):
        C.load_config(Job, None, ["stpes=1"])


def test_unknown_key_in_a_config_file_names_the_file_and_the_full_key(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("opt:\n  betass: [0.8, 0.9]\n")
    with pytest.raises(C.ConfigError) as e:
        C.load_config(Job, str(path))
    assert str(e.value) == f"{path}: unknown config key 'opt.betass'; did you mean 'opt.betas'?"


def test_bad_types_rejected():
    with pytest.raises(C.ConfigError, match="steps: expected an integer"):
        C.load_config(Job, None, ["steps=1.5"])
    with pytest.raises(C.ConfigError, match=r"patch: expected 3 values"):
        C.load_config(Job, None, ["patch=1,2"])
    with pytest.raises(C.ConfigError, match="not of the form"):
        C.load_config(Job, None, ["steps"])


@pytest.mark.parametrize("text", ["1e400", "-1e400", "3.29e1", "1e-1", "nan", "1.5e0"])
def test_an_integer_in_e_notation_that_is_no_whole_finite_number_is_refused(text):
    """YAML leaves 1e400 and 3.29e1 (no dot, or no signed exponent) as strings: int(float(...)) raised an
    OverflowError traceback for the first and stored 32 for the second."""
    with pytest.raises(C.ConfigError, match=rf"^steps: expected an integer, got '{text}'$"):
        C.load_config(Job, None, [f"steps={text}"])


def test_an_integer_in_e_notation_that_is_whole_is_taken():
    assert C.load_config(Job, None, ["steps=1e3"]).steps == 1000
    assert C.load_config(Job, None, ["steps=2.5e1"]).steps == 25


def test_yaml_file_base_and_roundtrip(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("steps: 7\nopt:\n  lr: 0.1\n")
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {base}\nname: child\nopt:\n  betas: [0.8, 0.9]\n")
    cfg = C.load_config(Job, str(child), ["steps=8"])
    assert (cfg.name, cfg.steps, cfg.opt.lr, cfg.opt.betas) == ("child", 8, 0.1, (0.8, 0.9))
    # The resolved config written next to a run loads back to the same object.
    dumped = tmp_path / "resolved.yaml"
    dumped.write_text(C.dump_yaml(cfg))
    assert C.load_config(Job, str(dumped)) == cfg


def test_missing_and_unknown_presets(tmp_path):
    with pytest.raises(C.ConfigError, match="config file not found"):
        C.load_config(Job, str(tmp_path / "nope.yaml"))
    with pytest.raises(C.ConfigError, match="unknown pretrain config 'vit_tinny'"):
        C.load_config(Job, "vit_tinny", kind="pretrain")


def test_a_base_chain_that_loops_is_one_line_naming_the_files(tmp_path):
    own = tmp_path / "self.yaml"
    own.write_text(f"base: {own}\nsteps: 3\n")
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(f"base: {b}\nsteps: 3\n")
    b.write_text(f"base: {a}\nsteps: 4\n")
    with pytest.raises(C.ConfigError, match="loops") as err:
        C.load_config(Job, str(own))
    assert str(own) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(C.ConfigError, match="loops") as err:
        C.load_config(Job, str(a))
    assert str(a) in str(err.value) and str(b) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["", "  "])
def test_an_empty_preset_name_is_refused(name):
    # An unset shell variable (`--site "$SITE"`) would otherwise load no preset and train on the defaults.
    with pytest.raises(C.ConfigError, match=r"^--site is empty \(an unset variable\?\): give a sites preset name"):
        C.load_config(Job, name, kind="sites")
    with pytest.raises(C.ConfigError, match=r"^--config is empty"):
        C.load_config(Job, name, kind="pretrain")
    assert C.load_config(Job, None).steps == 10  # no source at all stays the dataclass defaults


def test_invalid_yaml_is_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(C.ConfigError) as err:
        C.load_config(Job, str(bad))
    assert str(bad) in str(err.value) and "\n" not in str(err.value)


def test_a_value_for_a_whole_section_is_refused():
    """`train=5` replaced the section, and a later `train.num_labeled=...` (the job's own) rebuilt it from
    defaults: every preset value in it was lost without a word."""
    data = {"train": {"steps": 2800, "lr": 1e-3}}
    with pytest.raises(C.ConfigError, match=r"^train: is a config section, not a value \(set its keys, "
                                            r"e\.g\. train\.steps=\.\.\.\)$"):
        C.apply_overrides(data, ["train=5"])
    with pytest.raises(C.ConfigError, match=r"^train: is 5, not a config section, so 'train\.num_labeled' has"):
        C.apply_overrides({"name": "x"}, ["train=5", "train.num_labeled=4"])
    assert C.apply_overrides(data, ["train={steps: 3}"])["train"] == {"steps": 3, "lr": 1e-3}  # merged, see below
    assert data == {"train": {"steps": 2800, "lr": 1e-3}}  # the input is not changed


def test_a_section_given_as_a_mapping_keeps_the_presets_other_keys():
    """`train={steps: 1}` replaced the whole section: vit_tiny's global_batch 4 and image_every 100, and an
    earlier `train.global_batch=2`, fell back to the dataclass defaults (64, 1000) without a word. A mapping
    now sets its keys, deep, as a YAML file over its `base:` does."""
    from lnfm.jobs.pretrain import PretrainConfig

    cfg = C.load_config(PretrainConfig, "vit_tiny", ["train={steps: 1}"], kind="pretrain")
    assert (cfg.train.steps, cfg.train.global_batch, cfg.train.image_every, cfg.train.log_every) == (1, 4, 100, 10)
    cfg = C.load_config(PretrainConfig, "vit_tiny", ["train.global_batch=2", "train={steps: 1}",
                                                     "model={mask_ratio: 0.5}"], kind="pretrain")
    assert (cfg.train.steps, cfg.train.global_batch, cfg.model.mask_ratio) == (1, 2, 0.5)
    assert cfg.model.img_size == (32, 32, 32)
    nested = C.apply_overrides({"a": {"b": {"c": 1, "d": 2}, "e": 3}}, ["a={b: {c: 5}}"])
    assert nested == {"a": {"b": {"c": 5, "d": 2}, "e": 3}}
    assert C.override_keys(["a={b: {c: 5}, e: 1}", "f.g=2"]) == {"a.b.c", "a.e", "f.g"}


@dataclasses.dataclass
class Head:
    kind: str = "a"
    options: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class WithHead:
    head: Head | None = dataclasses.field(default_factory=Head)


def test_a_mapping_given_to_a_dict_valued_field_replaces_it():
    """Since sections merge (I14), a mapping merged into a dict-valued field too, so `head.options={}` could not
    clear it; given the config class, only a section merges, and the field is one key, set whole."""
    data = {"head": {"kind": "b", "options": {"x": 1}}}
    assert C.apply_overrides(data, ["head.options={y: 2}"], WithHead)["head"] == {"kind": "b", "options": {"y": 2}}
    assert C.apply_overrides(data, ["head={options: {}}"], WithHead)["head"] == {"kind": "b", "options": {}}
    assert C.apply_overrides(data, ["head.options.y=2"], WithHead)["head"]["options"] == {"x": 1, "y": 2}
    assert C.override_key_list(["head={kind: c, options: {y: 2}}"], WithHead) == ["head.kind", "head.options"]
    with pytest.raises(C.ConfigError, match=r"^head.options: given whole and as head.options.y among the "
                                            r"overrides; give it once$"):
        C.check_unique_overrides(["head.options.y=1", "head.options={}"], WithHead)


def test_a_single_value_option_given_twice_is_refused():
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--input")
    ap.add_argument("--format", action="append")
    ap.add_argument("--force", action="store_true")
    assert C.parse_args_once(ap, ["--input", "a", "--format", "x", "--format", "y", "--force"]).format == ["x", "y"]
    for argv in (["--input", "a", "--input", "b"], ["--input=a", "--input", "b"]):
        assert ap.parse_args(argv).input == "b"  # argparse alone keeps the last, silently
        with pytest.raises(C.ConfigError, match=r"^--input is given 2 times; give it once$"):
            C.parse_args_once(ap, argv)
