"""docs/configuration.md is generated from the config classes and must stay current."""

import dataclasses
import importlib
from pathlib import Path

from lnfm.jobs import configref

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_configuration_reference_is_current():
    assert DOC.read_text() == configref.render(), (
        "docs/configuration.md is stale: run `python -m lnfm.jobs.configref > docs/configuration.md`")


def _leaf_fields(cls, prefix=""):
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaf_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


def test_every_key_of_every_job_is_documented_with_a_meaning():
    text = configref.render()
    rows = {line.split("|")[1].strip().strip("`"): line for line in text.splitlines() if line.startswith("| `")}
    for _, target in configref.SECTIONS:
        module, name = target.split(":")
        cls = getattr(importlib.import_module(module), name)
        for key in _leaf_fields(cls):
            assert key in rows, f"{target}: {key} missing from the reference"
    # Every table row has exactly four cells: an unescaped '|' in a type or default would break it.
    for line in rows.values():
        cells = [c for c in line.replace("\\|", "").split("|")[1:-1]]
        assert len(cells) == 4, line
        assert cells[3].strip(), f"no meaning given: {line}"


def test_field_comments_reads_trailing_comments():
    from lnfm.data.synth import SynthConfig

    comments = configref.field_comments(SynthConfig)
    assert comments["num_cases"] == "cases per site"
    assert comments["seed"].startswith("dataset seed")
