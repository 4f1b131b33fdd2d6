"""Hostile input to the scale planner (launch/plan.py, `lnfm plan`; the module is named apart from
tests/jobs/test_plan.py, as pytest imports both by their base name): options and overrides the pretraining
job would refuse or that would make the figures meaningless, and --table paths that are not plan's to
replace. Every refusal comes before anything is compiled or written; the analytic and the compiled plan
refuse the same requests. The table's grid is shrunk to one tiny cell pair so that the rows that write
it take seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from harness import Case, World, run_case

# The analytic and the compiled plan of the same tiny request: 8 volumes of 32^3 (8^3 patches), over two
# data shards (analytic) or the test process's eight devices (compiled; refused before anything compiles).
ANALYTIC = ["--analytic", "--model", "vit_tiny", "--patch", "32", "--mesh", "data=2", "--global-batch", "8"]
COMPILED = ["--model", "vit_tiny", "--patch", "32", "--mesh", "data=8", "--global-batch", "8"]


def _with(base: list, **options) -> list:
    """`base` with these options (--global-batch and friends, written global_batch=...) replacing its own."""
    argv = list(base)
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


def option(id: str, argv: list, says: tuple) -> Case:
    """A bad option or override: exit 2, one line naming it, nothing written."""
    return Case(f"plan-{id}", "plan", lambda w, inp, out: (argv, None), 2, says)


def _notes(inp: Path, name: str = "notes.md") -> Path:
    (inp / name).write_text("my precious notes\n")
    return inp / name


def _own_table(path: Path, text: str = "| stale | table |\n") -> Path:
    """A table (and its JSON) as plan writes them."""
    from lnfm.jobs.plan import write_table

    write_table(path, text, [{"model": "stale"}])
    return path


def table_case(id: str, make_path, says: tuple, *extra, named=None) -> Case:
    """--table PATH where `make_path(inp)` prepares PATH (and whatever lies beside it); exit 2 naming it."""
    def make(w, inp, out):
        path = make_path(inp)
        return ["--table", path, "--compile-max-devices", "0", *extra], str(named(inp) if named else path)
    return Case(f"plan-table-{id}", "plan", make, 2, says)


def _users_json_beside(inp: Path) -> Path:
    (inp / "t.md.json").write_text('{"mine": true}\n')
    return inp / "t.md"


def _own_table_users_json(inp: Path) -> Path:
    path = _own_table(inp / "t.md")
    Path(f"{path}.json").write_text('{"mine": true}\n')  # the user's figures under the name plan used
    return path


def _own_table_edited(inp: Path) -> Path:
    path = _own_table(inp / "t.md")
    with path.open("a") as f:
        f.write("my note under the table\n")
    return path


def _folder(inp: Path) -> Path:
    (inp / "adir").mkdir()
    return inp / "adir"


def _below_a_file(inp: Path) -> Path:
    (inp / "afile").write_text("x")
    return inp / "afile" / "t.md"


def _link_to_notes(inp: Path) -> Path:
    (inp / "link.md").symlink_to(_notes(inp))
    return inp / "link.md"


def _json_of(path: Path) -> list:
    return json.loads(Path(f"{path}.json").read_text())


def _through_a_broken_link(inp: Path) -> Path:
    (inp / "tables").symlink_to(inp / "not-made-yet")
    return inp / "tables" / "t.md"


def _check_new_table(w, inp, out) -> None:
    from lnfm.jobs.plan import TABLE_MARK, own_table_json_digest

    text = (out / "t.md").read_text()
    lines = text.splitlines()
    assert lines[0].startswith(TABLE_MARK) and lines[1].startswith("| model | crop | devices |")
    assert [line.split(" | ")[:5] for line in lines[3:]] == [["| vit_tiny", "32^3", "2", "8", "dp"],
                                                             ["| vit_tiny", "32^3", "2", "8", "fsdp"]]
    cells = _json_of(out / "t.md")
    assert [(c["mesh"], c["global_batch"], c["source"]) for c in cells] == [
        ({"data": 2, "fsdp": 1, "tensor": 1}, 8, "analytic"), ({"data": 1, "fsdp": 2, "tensor": 1}, 8, "analytic")]
    assert own_table_json_digest(out / "t.md") is not None  # plan knows it for its own at the next --force


def _check_replaced(w, inp, out) -> None:
    _check_new_table(w, inp, out)
    assert "stale" not in (out / "t.md").read_text()


TABLE = [
    # the first audit of plan (D1): a user's notes were replaced, and notes.md.json written beside them, exit 0
    table_case("over-a-users-file", _notes, ("exists and is not a table lnfm plan wrote",)),
    table_case("over-a-users-file-with-force", _notes, ("exists and is not a table lnfm plan wrote",), "--force"),
    table_case("users-json-beside", _users_json_beside, ("is not the JSON lnfm plan wrote",),
               named=lambda inp: inp / "t.md.json"),
    table_case("own-table-with-a-users-json-beside", _own_table_users_json, ("is not the JSON lnfm plan wrote",),
               "--force", named=lambda inp: inp / "t.md.json"),
    table_case("own-table-without-force", lambda inp: _own_table(inp / "t.md"),
               ("exists (a table lnfm plan wrote); pass --force to replace it",)),
    table_case("own-table-edited-by-the-user", _own_table_edited, ("is not a table lnfm plan wrote (or was changed "
                                                                   "since)",), "--force"),
    table_case("link-to-a-users-file", _link_to_notes, ("exists and is not a table lnfm plan wrote",), "--force"),
    table_case("is-a-folder", _folder, ("is a folder; name the markdown file to write",)),  # was a traceback
    table_case("below-a-file", _below_a_file, ("afile is a file, not a folder",)),  # was a traceback
    # was a traceback after the table was computed (mkdir met the link)
    table_case("through-a-broken-link", _through_a_broken_link, ("a link to", "which does not exist")),
    Case("plan-table-with-a-single-plan-option", "plan",  # --model was ignored
         lambda w, inp, out: (["--table", inp / "t.md", "--model", "vit_h"], None), 2,
         ("--model: --table plans its own grid",)),
    # a model the table does not plan was accepted and compiled nothing, exit 0
    Case("plan-table-compile-models-unknown", "plan",
         lambda w, inp, out: (["--table", out / "t.md", "--compile-models", "vit_tiny,vit_bb"], None), 2,
         ("--compile-models vit_tiny,vit_bb: unknown model 'vit_bb' (the table's models: vit_tiny)",)),
    option("force-without-table", [*ANALYTIC, "--force"], ("--force: only --table reads it",)),
    Case("plan-table-new-file", "plan", lambda w, inp, out: (["--table", out / "t.md", "--compile-max-devices", "0"],
                                                             None), 0, check=_check_new_table),
    Case("plan-table-own-table-with-force", "plan",  # and the user's notes beside it stay
         lambda w, inp, out: (_notes(inp) and ["--table", _own_table(out / "t.md"), "--compile-max-devices", "0",
                                               "--force"], None), 0, check=_check_replaced),
]

MFU = ("--assumed-mfu must be in (0, 1]",)
OPTIONS = [
    # the audit's D12 (tracebacks) and D13 (exit 0 with meaningless figures), in the analytic and the compiled plan
    option("assumed-mfu-zero", _with(ANALYTIC, assumed_mfu="0"), (*MFU, "got 0")),
    option("assumed-mfu-zero-compiled", _with(COMPILED, assumed_mfu="0"), (*MFU, "got 0")),
    option("assumed-mfu-negative", _with(ANALYTIC, assumed_mfu="-0.5"), (*MFU, "got -0.5")),
    option("assumed-mfu-nan", _with(ANALYTIC, assumed_mfu="nan"), (*MFU, "got nan")),
    option("assumed-mfu-above-one", _with(ANALYTIC, assumed_mfu="5"), (*MFU, "got 5")),
    option("global-batch-zero", _with(ANALYTIC, global_batch="0"),
           ("--global-batch 0: train.global_batch must be at least 1",)),
    option("global-batch-zero-compiled", _with(COMPILED, global_batch="0"),
           ("--global-batch 0: train.global_batch must be at least 1",)),
    option("global-batch-negative-compiled", _with(COMPILED, global_batch="-8"),
           ("--global-batch -8: train.global_batch must be at least 1",)),
    option("global-batch-not-over-the-shards", _with(ANALYTIC, global_batch="3"),
           ("--global-batch 3: train.global_batch=3 must be a multiple of the 2 batch shards",)),
    option("global-batch-not-over-the-shards-compiled", _with(COMPILED, global_batch="12"),
           ("--global-batch 12: train.global_batch=12 must be a multiple of the 8 batch shards",)),
    # D14: 0 was read as "no --accum-steps"
    option("accum-steps-zero", _with(ANALYTIC, accum_steps="0"),
           ("--accum-steps 0: train.accum_steps must be at least 1",)),
    option("accum-steps-negative", _with(ANALYTIC, accum_steps="-2"),
           ("--accum-steps -2: train.accum_steps must be at least 1",)),
    option("accum-steps-not-dividing", _with(ANALYTIC, accum_steps="3"),
           ("--global-batch 8, --accum-steps 3:", "2 batch shards (mesh data x fsdp) times train.accum_steps=3")),
    option("accum-steps-not-dividing-compiled", _with(COMPILED, global_batch="16", accum_steps="3"),
           ("--global-batch 16, --accum-steps 3:", "8 batch shards (mesh data x fsdp) times train.accum_steps=3")),
    option("patch-below-one-patch", _with(ANALYTIC, patch="4"),
           ("--patch 4: model.img_size [4, 4, 4] is not a whole number of model.patch_size [8, 8, 8] tokens",)),
    option("patch-of-one-patch", _with(ANALYTIC, patch="8"),  # the mask would hide the only patch
           ("--patch 8: model.img_size [8, 8, 8] holds 1 token(s) of [8, 8, 8]",
            "model.mask_ratio 0.75 leaves 0 visible")),
    option("patch-not-a-multiple", _with(ANALYTIC, patch="36"),  # the analytic grid was floored to 4^3
           ("--patch 36: model.img_size [36, 36, 36] is not a whole number of model.patch_size [8, 8, 8] tokens",)),
    option("patch-not-a-multiple-compiled", _with(COMPILED, patch="36"),
           ("--patch 36: model.img_size [36, 36, 36] is not a whole number of model.patch_size",)),
    option("dtype-float16-compiled", _with(COMPILED, dtype="float16"),
           ("--dtype float16: the compiled plan runs on XLA:CPU", "--analytic")),
    # D15: an override of what an option sets was used (figures for 64^3 under 'crop 32^3') or ignored
    option("mesh-axis-twice", _with(ANALYTIC, mesh="data=2,data=4"), ("--mesh data=2,data=4: the axis 'data' is "
                                                                     "given twice",)),
    option("override-img-size-beside-patch", [*ANALYTIC, "model.img_size=64,64,64"],
           ("override model.img_size=64,64,64: --patch 32 sets model.img_size",)),
    option("override-mesh-data-beside-mesh", [*ANALYTIC, "mesh.data=8"],
           ("override mesh.data=8: --mesh data=2 sets mesh.data",)),
    option("override-mesh-section-beside-mesh", [*ANALYTIC, "mesh={data: 8}"],
           ("override mesh={data: 8}: --mesh data=2 sets mesh.data",)),
    option("override-global-batch-beside-option", [*ANALYTIC, "train.global_batch=16"],
           ("override train.global_batch=16: --global-batch 8 sets train.global_batch",)),
    option("override-accum-steps-beside-option", [*_with(ANALYTIC, accum_steps="2"), "train.accum_steps=4"],
           ("override train.accum_steps=4: --accum-steps 2 sets train.accum_steps",)),
    # the pretraining job's own checks (D13)
    option("override-steps-zero", [*ANALYTIC, "train.steps=0"], ("train.steps must be at least 1",)),
    option("override-lr-negative", [*ANALYTIC, "optim.lr=-1"], ("optim.lr must be in [0, inf)",)),
    option("override-checkpoint-keep-zero", [*ANALYTIC, "checkpoint.keep=0"], ("checkpoint.keep must be at least 1",)),
    option("override-unknown-key", [*ANALYTIC, "model.bogus=1"],
           ("unknown config key 'model.bogus'; did you mean 'model.qkv_bias'?",)),
]

ALL = TABLE + OPTIONS


@pytest.fixture
def small_table(monkeypatch):
    """The table's grid cut to vit_tiny at 32^3 on 2 devices (DP and FSDP), 4 volumes per device."""
    from lnfm.jobs import plan

    monkeypatch.setattr(plan, "TABLE_MODELS", ("vit_tiny",))
    monkeypatch.setattr(plan, "TABLE_PATCHES", (32,))
    monkeypatch.setattr(plan, "TABLE_DEVICES", (2,))


@pytest.mark.parametrize("case", ALL, ids=[c.id for c in ALL])
def test_hostile_plan(case, small_table, tmp_path, capsys):
    # plan reads nothing of the shared world: every file a case must leave unchanged is in its input folder
    world = World(tmp_path, *[None] * 8, trees=[])
    run_case(case, world, tmp_path, capsys)
