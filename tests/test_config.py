"""The schema and the library's dataclasses agree, and both reject bad configs by key."""

import dataclasses
from pathlib import Path

import jsonschema
import pytest
import yaml

from indextts.config import SECTIONS, ConfigError, parse_config, section_class, section_dict

REPO = Path(__file__).resolve().parents[1]
SCHEMA = yaml.safe_load((REPO / "schemas/config.schema.yaml").read_text())
CONFIGS = [REPO / "config.yaml", *sorted((REPO / "config").glob("*.yaml"))]


def schema_defaults(schema: dict) -> dict:
    return {k: v["default"] for k, v in schema.get("properties", {}).items() if "default" in v}


@pytest.mark.parametrize("section", list(SECTIONS))
def test_schema_section_matches_dataclass_fields_and_defaults(section):
    props = SCHEMA["properties"]
    assert section in props, f"schema lacks section {section}"
    assert props[section].get("additionalProperties") is False
    cls = section_class(section)
    fields = {f.name for f in dataclasses.fields(cls)}
    assert set(props[section]["properties"]) == fields
    for f in dataclasses.fields(cls):
        spec = props[section]["properties"][f.name]
        assert "description" in spec or "properties" in spec, f"{section}.{f.name} has no description"
        if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if dataclasses.is_dataclass(default):
                # A nested section: every leaf default must match too.
                assert schema_defaults(spec) == section_dict(default), f"{section}.{f.name}"
            else:
                assert "default" in spec, f"{section}.{f.name} has no schema default"
                assert spec["default"] == section_dict(default), f"{section}.{f.name}: schema {spec['default']!r} != dataclass {default!r}"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate_against_schema_and_dataclasses(path):
    raw = yaml.safe_load(path.read_text())
    jsonschema.validate(raw, SCHEMA)
    parse_config(raw)


def test_every_config_yaml_key_is_commented():
    lines = (REPO / "config.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith("#") or stripped.startswith("- "):
            continue
        key = stripped.split(":")[0]
        has_comment = "#" in line or (i > 0 and lines[i - 1].strip().startswith("#"))
        assert has_comment, f"config.yaml line {i + 1}: key {key!r} has no comment"


def test_unknown_key_and_wrong_type_are_named_all_at_once():
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    raw["clean"]["min_durration"] = 1
    raw["speakers"]["top_k"] = "many"
    raw["bogus"] = {}
    with pytest.raises(ConfigError) as e:
        parse_config(raw)
    msg = str(e.value)
    assert "clean.min_durration: unknown key" in msg
    assert "speakers.top_k: expected an integer, got 'many'" in msg
    assert "bogus: unknown section" in msg


def test_schema_rejects_an_empty_punctuation_map_key():
    # An empty key would match between every two characters; the schema names it.
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    raw["text"]["punctuation_map"] = {"": "x", "!": "."}
    with pytest.raises(jsonschema.ValidationError, match="should be non-empty|is too short"):
        jsonschema.validate(raw, SCHEMA)
    raw["text"]["punctuation_map"] = {"!": "."}
    jsonschema.validate(raw, SCHEMA)
