"""Generate docs/configuration.md from the config dataclasses, so the reference cannot drift.

Each field's description is its trailing `# comment` in the class source (the comments of a
field wrapped over several lines are joined).
`python -m lnfm.jobs.configref > docs/configuration.md`; a test checks the file is current.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import io
import re
import sys
import tokenize
import typing

# (job or section title, "module:Class") in the order a user meets them.
SECTIONS: list[tuple[str, str]] = [
    ("Phantoms: `data_prep/synth.py`", "lnfm.data.synth:SynthConfig"),
    ("Prepare: `data_prep/prepare.py`", "lnfm.data.prepare:PrepareConfig"),
    ("Pretraining: `pretrain/pretrain.py`", "lnfm.jobs.pretrain:PretrainConfig"),
    ("Finetuning: `finetune/finetune.py`", "lnfm.jobs.finetune_config:FinetuneConfig"),
    ("Transfer study: `finetune/study.py`", "lnfm.jobs.study:StudyConfig"),
]


def field_comments(cls: type) -> dict[str, str]:
    """Map field name -> its trailing comment in the class body."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    pending: str | None = None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NEWLINE:
            pending = None
        elif tok.type == tokenize.NAME and pending is None and tok.start[1] == 4:
            pending = tok.string
        elif tok.type == tokenize.COMMENT and pending:  # a field wrapped over lines continues its comment
            text = tok.string.lstrip("#").strip()
            comments[pending] = f"{comments[pending]} {text}" if pending in comments else text
    return comments


def _type_name(tp: typing.Any) -> str:
    text = tp.__name__ if isinstance(tp, type) else str(tp)
    return re.sub(r"\b(typing|builtins)\.", "", text)


def _default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = field.default_factory()  # type: ignore[misc]
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        return "(section)"
    return f"`{value!r}`"


def describe(cls: type, prefix: str = "") -> list[str]:
    """Markdown table rows for `cls` and, recursively, its nested sections."""
    rows, nested = [], []
    hints = typing.get_type_hints(cls)
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # inherited fields keep their base class's comments
        if dataclasses.is_dataclass(klass):
            comments.update(field_comments(klass))
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            nested.append((f"{prefix}{f.name}.", tp))
            continue
        desc = comments.get(f.name, "").replace("|", "\\|")
        tname = _type_name(tp).replace("|", "\\|")  # a union's bar would split the table cell
        rows.append(f"| `{prefix}{f.name}` | `{tname}` | {_default(f).replace('|', chr(92) + '|')} | {desc} |")
    for sub_prefix, tp in nested:
        rows.extend(describe(tp, sub_prefix))
    return rows


def render() -> str:
    out = ["# Configuration reference", "",
           "Generated from the config dataclasses by `python -m lnfm.jobs.configref`; do not edit by hand.",
           "Every key can be set in a YAML file or on the command line as `key.sub=value`, each key once. A section",
           "given as a mapping, `\"train={steps: 1}\"`, sets the keys it lists and keeps the others (as a YAML file",
           "does over its `base:`); a mapping given to a key whose type is a `dict` (`head.options`) replaces it, on",
           "the command line and in a file over its base, so `\"head.options={}\"` clears it. A key you set that the",
           "chosen mode never reads (`strategy.k` with `strategy.freeze=lora`, `loss.focal_gamma` with",
           "`loss.name=dice_ce`, `model.patch_size` with `model.arch=swin`, ...) is refused; a preset's value of one",
           "is not.", ""]
    for title, target in SECTIONS:
        module, name = target.split(":")
        cls = getattr(importlib.import_module(module), name)
        out += [f"## {title}", "", f"`{target.replace(':', '.')}`", "",
                "| key | type | default | meaning |", "|---|---|---|---|", *describe(cls), ""]
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(render())
