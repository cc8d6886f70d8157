"""Typed, frozen configuration sections and a strict parser for them.

Every stage of the library reads one or more *sections* of the pipeline config (``data``,
``text``, ``clean`` ...). Each section is a frozen dataclass defined next to the code that uses
it. The Snakemake workflow validates the whole config against ``schemas/config.schema.yaml``
when the DAG is built; the library checks it a second time here, when a stage starts, so a
library user who never goes through Snakemake gets the same errors: an unknown key or a wrong
type names the key (``clean.min_duration: expected a number, got 'x'``).

The CLI passes each stage only the sections it reads (as JSON, see :func:`load_config_arg`),
which is what makes Snakemake's ``params`` rerun trigger exact.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type; the message names the key."""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    if tp is type(None):
        return "null"
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp`` and convert it (lists to tuples, dicts to
    dataclasses). Raises ConfigError naming ``key``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return parse_section(tp, value, key)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        args = [a for a in get_args(tp) if a is not Ellipsis]
        item_tp = args[0] if args else Any
        return tuple(_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        # Stored as a sorted tuple of pairs so the frozen dataclass stays hashable.
        return tuple(
            sorted((_convert(k, kt, f"{key}.{k}"), _convert(v, vt, f"{key}.{k}")) for k, v in value.items())
        )
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def parse_section(cls: type[T], data: Mapping[str, Any] | None, where: str) -> T:
    """Build the frozen dataclass ``cls`` from ``data``, checking every key and type.

    Args:
        cls: a dataclass whose fields carry defaults for optional keys.
        data: the mapping from the config file (``None`` means all defaults).
        where: the dotted path of this section in the config, used in error messages.

    Returns:
        An instance of ``cls``; lists become tuples and mappings sorted tuples of pairs.

    Raises:
        ConfigError: for an unknown key, a missing required key or a wrong type; every problem
            in the section is reported at once.
    """
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    errors: list[str] = []
    for k in data:
        if k not in fields:
            errors.append(f"{where}.{k}: unknown key (known keys: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}"
        if name in data:
            try:
                kwargs[name] = _convert(data[name], hints[name], key)
            except ConfigError as e:
                errors.append(str(e))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append(f"{key}: required key is missing")
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return cls(**kwargs)


def section_dict(obj: Any) -> Any:
    """The inverse of :func:`parse_section`: plain JSON-able data (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: section_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [section_dict(v) for v in obj]
    return obj


def load_config_arg(arg: str) -> dict[str, Any]:
    """Read a ``--config`` CLI argument: inline JSON (what Snakemake rules pass) or a path to a
    YAML/JSON file (what people pass by hand)."""
    text = arg.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config: not valid JSON ({e})") from e
    path = Path(arg)
    if not path.exists():
        raise ConfigError(f"--config: {arg!r} is neither inline JSON nor an existing file")
    with path.open(encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping at the top level")
    return data


def merge_runtime(config: Mapping[str, Any], runtime: Mapping[str, Any] | None) -> dict[str, Any]:
    """``config`` with the runtime knobs of ``runtime`` (``{section: {key: value}}``) laid over it.

    Rules keep knobs that cannot change a result out of ``--config`` (their ``params``, so
    changing one reruns nothing) and pass them as ``--runtime``; this puts them back.
    """
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in config.items()}
    for section, values in (runtime or {}).items():
        if not isinstance(values, Mapping):
            raise ConfigError(f"--runtime: section {section!r} must be a mapping, got {values!r}")
        out.setdefault(section, {})
        out[section] = {**(out[section] or {}), **values}
    return out


def get_section(cls: type[T], config: Mapping[str, Any], name: str) -> T:
    """Parse ``config[name]`` into ``cls`` (all defaults when the section is absent)."""
    return parse_section(cls, config.get(name), name)


def pairs(mapping: Mapping[Any, Any] | tuple[tuple[Any, Any], ...]) -> tuple[tuple[Any, Any], ...]:
    """The (key, value) pairs of a mapping field, whether it came through :func:`parse_section`
    (a sorted tuple of pairs) or was given as a dict by library code."""
    return tuple(mapping.items()) if isinstance(mapping, Mapping) else tuple(mapping)


# Every top-level config section and the dataclass that parses it, imported only when needed.
SECTIONS: dict[str, str] = {
    "demo": "indextts.demo:DemoConfig",
    "data": "indextts.manifest:DataConfig",
    "text": "indextts.text:TextConfig",
    "clean": "indextts.manifest:CleanConfig",
    "asr_filter": "indextts.asr_filter:AsrFilterConfig",
    "vocab": "indextts.vocab:VocabConfig",
    "speakers": "indextts.speakers:SpeakersConfig",
    "codec": "indextts.codes:CodecConfig",
    "codes": "indextts.codes:CodesConfig",
    "features": "indextts.features:PromptFeaturesConfig",
    "model": "indextts.model.config:ModelSection",
    "pretrained": "indextts.pretrained:PretrainedConfig",
    "validate": "indextts.validate:ValidateConfig",
    "train": "indextts.train:TrainConfig",
    "synthesize": "indextts.synthesize:SynthesizeConfig",
    "samples": "indextts.synthesize:SamplesConfig",
    "eval": "indextts.evaluation.scoring:EvalConfig",
    "report": "indextts.report:ReportConfig",
}


def section_class(name: str) -> type:
    """The dataclass for config section ``name``."""
    import importlib

    module, cls = SECTIONS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def parse_config(raw: Mapping[str, Any]) -> dict[str, Any]:
    """Parse every section of a whole pipeline config, reporting all problems at once.

    Raises:
        ConfigError: naming each unknown section, unknown key and wrongly typed value.
    """
    errors = [f"{k}: unknown section (known: {', '.join(SECTIONS)})" for k in raw if k not in SECTIONS]
    out = {}
    for name in SECTIONS:
        try:
            out[name] = get_section(section_class(name), raw, name)
        except ConfigError as e:
            errors += [line.strip() for line in str(e).splitlines()[1:]] or [str(e)]
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
    return out
