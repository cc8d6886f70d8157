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
# Schema sections that only the workflow reads (rules/common.smk), never the library, so they have
# no dataclass: run (where a run writes).
WORKFLOW_SECTIONS = ("run",)


def library_sections(raw: dict) -> dict:
    """A whole config less the WORKFLOW_SECTIONS: what the library's parse_config sees."""
    return {k: v for k, v in raw.items() if k not in WORKFLOW_SECTIONS}


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


def test_every_schema_section_is_read_by_the_library_or_the_workflow():
    assert set(SCHEMA["properties"]) == set(SECTIONS) | set(WORKFLOW_SECTIONS)
    assert not set(SECTIONS) & set(WORKFLOW_SECTIONS)


@pytest.mark.parametrize("section", WORKFLOW_SECTIONS)
def test_workflow_sections_are_closed_described_and_defaulted(section):
    spec = SCHEMA["properties"][section]
    assert spec.get("additionalProperties") is False and spec.get("default") == {} and "description" in spec
    for key, prop in spec["properties"].items():
        assert "description" in prop and "default" in prop, f"{section}.{key}"


def test_run_folders_default_to_the_demo_folders_and_each_real_config_has_its_own():
    run = SCHEMA["properties"]["run"]["properties"]
    assert (run["results_dir"]["default"], run["logs_dir"]["default"]) == ("results", "logs")
    folders = {}
    for path in CONFIGS:
        cfg = yaml.safe_load(path.read_text()).get("run") or {}
        folders[path.name] = (cfg.get("results_dir", "results"), cfg.get("logs_dir", "logs"))
    assert folders["config.yaml"] == ("results", "logs")
    every = [d for pair in folders.values() for d in pair]
    assert len(every) == len(set(every)), f"configs share a folder: {folders}"


def test_schema_rejects_a_run_folder_with_braces():
    # Snakemake would read {x} in an output path as a wildcard.
    raw = yaml.safe_load((REPO / "config.yaml").read_text())
    raw["run"]["results_dir"] = "results/{lang}"
    with pytest.raises(jsonschema.ValidationError, match="does not match"):
        jsonschema.validate(raw, SCHEMA)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate_against_schema_and_dataclasses(path):
    raw = yaml.safe_load(path.read_text())
    jsonschema.validate(raw, SCHEMA)
    parse_config(library_sections(raw))


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
    raw = library_sections(yaml.safe_load((REPO / "config.yaml").read_text()))
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
