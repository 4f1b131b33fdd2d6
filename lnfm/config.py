"""Typed configs: dataclasses loaded from YAML with `key.sub=value` overrides.

Every job defines its config as nested dataclasses. `load_config` builds one from
a packaged preset name or a YAML path, applies command-line overrides, and
rejects unknown keys with the closest valid key in the message. The resolved
config is written next to every run by `lnfm.workdir`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from lnfm.errors import LnfmError

T = TypeVar("T")

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(LnfmError, ValueError):
    """A config key, value or command-line option that does not fit the typed schema or cannot work."""


def check_in(section: str, cfg: typing.Any, name: str, ok: typing.Callable[[float], bool], interval: str,
             what: str = "") -> None:
    """Refuse `cfg.name` (a float; None is unset) unless finite and `ok`, naming `section.name`, its valid
    `interval` and `what` it means: the one wording of every section's range checks."""
    value = getattr(cfg, name)
    if value is not None and not (math.isfinite(value) and ok(value)):
        raise ConfigError(f"{section}.{name} must be in {interval}{what}, got {value:g}")


def _closest(key: str, valid: list[str], section: str = "") -> str:
    """'; did you mean ...?' with the closest of `valid`, named in full (`section.key`) as it is typed."""
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    return f"; did you mean '{section + '.' if section else ''}{match[0]}'?" if match else ""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (tuple, list):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            # Accept "16,16,8" or a scalar where a sequence is expected.
            value = [v for v in str(value).split(",")] if isinstance(value, str) else [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            items = [_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            inner = args[0] if args else Any
            items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            number = float(value) if isinstance(value, str) and "e" in value.lower() else value  # YAML leaves 1e3 a str
            if isinstance(number, float) and not number.is_integer():  # 3.29e1, 1e-1, 1e400 (inf), nan
                raise ValueError
            return int(number)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[T], data: dict, where: str = "") -> T:
    """Build dataclass `cls` from a nested dict; unknown keys are errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        full = f"{where}.{key}" if where else key
        raise ConfigError(f"unknown config key '{full}'{_closest(key, list(fields), where)}")
    missing = [n for n, f in fields.items() if n not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        full = f"{where}.{missing[0]}" if where else missing[0]
        raise ConfigError(f"missing config key '{full}'")
    kwargs = {}
    for name, value in data.items():
        full = f"{where}.{name}" if where else name
        kwargs[name] = _coerce(value, hints[name], full)
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    """Dataclass (nested) -> plain dict of YAML-safe values."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def _merge(base: dict, extra: dict, cls: type | None = None, path: tuple[str, ...] = ()) -> dict:
    """`extra` over `base`, deep; a mapping over a dict-valued field of config `cls` (at `path`) replaces it."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and _is_section(cls, [*path, k]):
            out[k] = _merge(out[k], v, cls, (*path, k))
        else:
            out[k] = v
    return out


def _is_section(cls: type | None, path: list[str]) -> bool:
    """Whether `path` of config dataclass `cls` is a section (a dataclass: a mapping given to it merges) rather
    than a value (a dict-valued field such as head.options: a mapping given to it replaces it). Without `cls`,
    every path a mapping is given to is taken for a section."""
    if cls is None:
        return True
    tp: Any = cls
    for part in path:
        hints = typing.get_type_hints(tp) if dataclasses.is_dataclass(tp) else {}
        if part not in hints:
            return False
        tp = hints[part]
        if typing.get_origin(tp) in (typing.Union, types.UnionType):  # `Section | None`
            tp = next((a for a in typing.get_args(tp) if a is not type(None)), tp)
    return dataclasses.is_dataclass(tp)


def _set_keys(path: list[str], value: Any, cls: type | None = None) -> list[str]:
    """The dotted keys one override sets: a section given as a mapping sets each of its keys (merged into
    the section, `apply_overrides`), not the section whole; a dict-valued field of `cls` is set whole."""
    if isinstance(value, dict) and value and _is_section(cls, path):
        return [key for sub, v in value.items() for key in _set_keys([*path, str(sub)], v, cls)]
    return [".".join(path)]


def override_key_list(overrides, cls: type | None = None) -> list[str]:
    """The dotted keys `key.sub=value` overrides of config `cls` set, in order, a key as often as it is set."""
    return [key for text in overrides for key in _set_keys(*parse_override(text), cls)]


def override_keys(overrides, cls: type | None = None) -> set[str]:
    """The dotted keys `key.sub=value` overrides of config `cls` set."""
    return set(override_key_list(overrides, cls))


def refuse_derived(overrides, derived: dict[str, str], job: str) -> None:
    """Refuse an override of a key `job` derives from another (key -> what it derives from): the run would
    record the override in config.yaml and never use it."""
    for key in sorted(override_keys(overrides)):
        if key in derived:
            raise ConfigError(f"{key}: {job} sets it from {derived[key]}; set that instead")


def refuse_derived_in_files(given: dict[str, Path | None], derived: dict[str, tuple[str, Any, Any]], job: str
                            ) -> None:
    """Refuse a derived key the user's own file sets (`given`: key -> their file) to a value other than the one
    `job` derives (`derived`: key -> (source, the file's value, the derived value)); a run's config.yaml records
    the derived values, so an equal one is accepted (an override of one is `refuse_derived`'s)."""
    for key, (source, value, used) in sorted(derived.items()):
        if given.get(key) and [float(v) for v in value] != [float(v) for v in used]:
            raise ConfigError(f"{given[key]}: {key} {list(value)} differs from {list(used)}, which {job} sets it "
                              f"to from {source}; remove it from the file and set that instead")


def refuse_batch_in_file(given: dict[str, Path | None], key: str, value: int, global_batch: int, job: str) -> None:
    """Refuse a per-process batch `key` the user's own file sets that no process count makes of train.global_batch:
    `job` sets it to global_batch / processes (which a run's config.yaml records, so a share of it is accepted)."""
    if given.get(key) and (value <= 0 or global_batch % value):
        raise ConfigError(f"{given[key]}: {key} {value} is not a per-process share of train.global_batch "
                          f"({global_batch}), which {job} sets it from; remove it from the file and set "
                          f"train.global_batch instead")


def unread_in_mode(section: str, mode_key: str, mode: str, reads: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """The `section` keys that `section.mode_key=mode` never reads -> why, for `refuse_unread`; `reads` maps each
    mode-dependent key to the modes that read it."""
    return {f"{section}.{key}": f"read only with {section}.{mode_key}={' or '.join(modes)}, and {section}.{mode_key} "
                                f"is {mode}" for key, modes in reads.items() if mode not in modes}


def refuse_unread(given: dict[str, Path | None], unread: dict[str, str]) -> None:
    """Refuse a key the user set (`given_keys`: key -> their file, None for an override) that the chosen mode never
    reads (`unread`: key -> why): the run would record it in config.yaml and never use it. A value from a preset
    or a job's defaults is not refused."""
    keys = sorted(k for k in unread if k in given)
    if keys:
        first = keys[0]
        same = [k for k in keys if (unread[k], given[k]) == (unread[first], given[first])]
        where = f"{given[first]}: " if given[first] else ""
        raise ConfigError(f"{where}{', '.join(same)}: {unread[first]} (the run would record a value it never "
                          f"uses); drop {'it' if len(same) == 1 else 'them'}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=1e-3' -> (['train', 'lr'], 0.001). Values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def check_unique_overrides(overrides, cls: type | None = None) -> None:
    """Refuse a key given twice among the user's overrides of config `cls`, or given whole and a key inside it
    given as well (`head.options={...}` replaces the field): the last one would win without a word. (Internal
    callers layer override lists on purpose, later ones over earlier ones: `apply_overrides` keeps the last.)"""
    seen: list[str] = []
    for key in override_key_list(overrides, cls):  # `train={steps: 1}` sets train.steps
        if key in seen:
            raise ConfigError(f"{key}: given twice as an override; give it once")
        inner = next((k for k in seen if k.startswith(key + ".") or key.startswith(k + ".")), None)
        if inner is not None:
            whole, part = sorted((key, inner), key=len)
            if not _is_section(cls, whole.split(".")):  # a section given a value is apply_overrides' to refuse
                raise ConfigError(f"{whole}: given whole and as {part} among the overrides; give it once")
        seen.append(key)


def apply_overrides(data: dict, overrides: list[str], cls: type | None = None) -> dict:
    """`data` with the overrides set, in order. A mapping given to a section merges into it, as a file over its
    base: does; one given to a dict-valued field of `cls` (head.options) replaces it, so `head.options={}` clears
    it."""
    data = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if child is not None and not isinstance(child, dict):  # set whole by an earlier override
                raise ConfigError(f"{'.'.join(path[:i + 1])}: is {child!r}, not a config section, so "
                                  f"'{'.'.join(path)}' has nowhere to go")
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        section = isinstance(node.get(path[-1]), dict) and _is_section(cls, path)
        if section and not isinstance(value, dict):
            raise ConfigError(f"{'.'.join(path)}: is a config section, not a value (set its keys, "
                              f"e.g. {'.'.join(path)}.{next(iter(node[path[-1]]), 'KEY')}=...)")
        if section:  # `train={steps: 1}` sets train.steps and keeps the section's other keys
            value = _merge(node[path[-1]], value, cls, tuple(path))
        node[path[-1]] = value
    return data


def preset_path(kind: str, name_or_path: str) -> Path:
    """Resolve a packaged preset name (e.g. 'vit_tiny') or a YAML path."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        return path
    packaged = CONFIG_DIR / kind / f"{name_or_path}.yaml"
    if packaged.is_file():
        return packaged
    names = sorted(p.stem for p in (CONFIG_DIR / kind).glob("*.yaml"))
    raise ConfigError(f"unknown {kind} config '{name_or_path}'{_closest(name_or_path, names)} "
                      f"(choices: {', '.join(names)})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"key '{key}' is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1}); "
                              f"keep one")
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml(path: str | Path, *, allow_empty: bool = True) -> dict:
    """A YAML file whose top level is a mapping, each key once; an empty file is {} unless not `allow_empty`."""
    try:
        data = yaml.load(Path(path).read_text(), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    if data is None:
        if not allow_empty:
            raise ConfigError(f"{path}: the config file is empty (give at least one key, e.g. base: NAME)")
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def load_yaml_with_base(path: Path, kind: str, _chain: tuple[Path, ...] = (), cls: type | None = None) -> dict:
    """Read a YAML config of dataclass `cls`; a top-level `base: NAME` inherits from another preset (its sections
    merged, its dict-valued fields replaced: `_merge`). A file that is its own base, directly or through others,
    is refused naming the files of the loop."""
    resolved = Path(path).resolve()
    if resolved in _chain:
        loop = [*_chain[_chain.index(resolved):], resolved]
        raise ConfigError(f"{path}: the 'base:' chain loops ({' -> '.join(map(str, loop))}); "
                          f"give a base that does not lead back to this file")
    data = read_yaml(path, allow_empty=False)
    base = data.pop("base", None)
    if base:
        data = _merge(load_yaml_with_base(preset_path(kind, base), kind, (*_chain, resolved), cls), data, cls)
    return data


def load_config(cls: type[T], source: str | Path | None = None, overrides: list[str] = (), *,
                kind: str = "", defaults: dict | None = None) -> T:
    """Dataclass defaults <- `defaults` <- YAML preset/path <- overrides."""
    return from_dict(cls, config_data(cls, source, overrides, kind=kind, defaults=defaults))


def config_data(cls: type, source: str | Path | None = None, overrides: list[str] = (), *,
                kind: str = "", defaults: dict | None = None) -> dict:
    """What `load_config` builds `cls` from: `defaults` <- YAML preset/path <- overrides, as a dict
    (a key absent from it takes the dataclass default; a job can tell what was set)."""
    data: dict = dict(defaults or {})
    if source is not None and not str(source).strip():  # an unset shell variable: no preset would load
        option = "--site" if kind == "sites" else "--config"  # the option each job reads its preset from
        raise ConfigError(f"{option} is empty (an unset variable?): give a {kind or 'config'} preset name or a "
                          f"YAML path")
    if source:
        path = preset_path(kind, str(source))
        data = _merge(data, load_yaml_with_base(path, kind, cls=cls), cls)
        if Path(str(source)).suffix in (".yaml", ".yml"):
            try:  # a bad key or value in the user's own file: name the file
                from_dict(cls, data)
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
    return apply_overrides(data, list(overrides), cls)


def given_keys(cls: type, source: str | Path | None, overrides: list[str] = (), *, kind: str = "",
               defaults: dict | None = None, preset_key: str | None = None,
               replaced: dict | None = None) -> dict[str, Path | None]:
    """The dotted keys the user set -> their file (None: an override). An override's whatever its value; a key of
    the user's own YAML files (`source` when it is a path, and the files outside the packaged presets its `base:`
    chain names) when its value differs from the one `defaults`, the packaged base and the dataclass give (a run's
    config.yaml, given again, records every key). A packaged preset's keys and `defaults` are not the user's; nor
    is what a job adds (--quick), which the caller leaves out of `overrides`. Call it after `config_data` has
    loaded `source` (which refuses a missing file or a looping chain). `preset_key` (e.g. `site.name`) names the
    packaged preset of a chain with no packaged base: a run's config.yaml records the preset's values of keys its
    mode never reads, and given again they are still the preset's, not the user's. `replaced` holds what the job
    puts in place of the files' values (finetuning's model section under --init, the encoder's): a file's key
    there is the user's where it differs from that."""
    own, path = [], preset_path(kind, str(source)) if source else None
    while path is not None and not path.resolve().is_relative_to(CONFIG_DIR.resolve()):
        own.append((path, read_yaml(path)))
        path = preset_path(kind, own[-1][1]["base"]) if own[-1][1].get("base") else None
    if path is None and own and preset_key:
        name = _lookup(own[-1][1], preset_key)
        if isinstance(name, str) and (CONFIG_DIR / kind / f"{name}.yaml").is_file():
            path = CONFIG_DIR / kind / f"{name}.yaml"
    base = load_yaml_with_base(path, kind, cls=cls) if path else {}
    baseline = _merge(_merge(to_dict(cls()), _merge(dict(defaults or {}), base, cls), cls), replaced or {}, cls)
    keys: dict[str, Path | None] = {}
    for file, data in reversed(own):  # the file nearest to `source` wins, as in the merge
        keys |= {key: file for key, value in _leaves({k: v for k, v in data.items() if k != "base"})
                 if to_dict(value) != _lookup(baseline, key)}
    return keys | dict.fromkeys(override_key_list(overrides, cls))  # a section given whole sets each key it holds


def _leaves(data: dict, prefix: str = ""):
    """(dotted key, value) of each leaf of a nested mapping."""
    for k, v in data.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _lookup(data: dict, key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return to_dict(node)


_MISSING = object()


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)


def replace(cfg: T, **changes: Any) -> T:
    return dataclasses.replace(cfg, **changes)


def parse_args_once(parser: argparse.ArgumentParser, argv: list[str] | None = None,
                    cls: type | None = None) -> argparse.Namespace:
    """`parser.parse_args(argv)`, refusing a single-value option given twice: argparse keeps the last one,
    so `--input a --input b` would segment b alone without a word (repeatable options are `append`); and
    refusing a key given twice among the `overrides` key=value arguments (of config `cls`), for the same reason."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    check_unique_overrides(getattr(args, "overrides", None) or [], cls)  # the jobs' positional key=value list
    for action in parser._actions:  # argparse has no public listing of its actions
        if not isinstance(action, argparse._StoreAction) or not action.option_strings:
            continue
        given = [a for a in argv if a.split("=", 1)[0] in action.option_strings]
        if len(given) > 1:
            raise ConfigError(f"{action.option_strings[-1]} is given {len(given)} times; give it once")
    return args
