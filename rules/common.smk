# Helpers shared by the rules/*.smk files (config validation, stage configs and code identity for
# exact reruns, output paths). No rule logic lives here beyond get_* input functions.
import hashlib
import json
import os
from pathlib import Path

from snakemake.utils import validate

# Checked before any job runs: an unknown key or a wrong type stops the DAG and names the key.
# Defaults from the schema are filled in, so every rule sees the complete section.
validate(config, workflow.source_path("../schemas/config.schema.yaml"), set_default=True)

PKG = Path(workflow.basedir) / "indextts"
# Where envs/indextts.post-deploy.sh finds this package to install it into the conda env of
# `--sdm conda` (Snakemake copies the env files away from the repository before using them).
os.environ.update(INDEXTTS_SOURCE=str(Path(workflow.basedir)))


# Knobs that cannot change a result (worker counts, speed-only batching, logging, progress):
# kept out of params so changing them reruns nothing. Rules hand them to the CLI as
# ``--runtime {RUNTIME:q}``; the library merges them back onto --config.
RUNTIME_KEYS = {
    # Batched extraction is tested equal to one utterance at a time, so batch sizes are speed only.
    "codes": (
        "num_workers",
        "num_workers_cpu",
        "batch_seconds_cpu",
        "batch_seconds_cuda",
        "max_batch_size",
    ),
    "train": ("num_workers", "log_every", "progress"),
}


def stage_config(*sections):
    """The config sections a stage reads, less RUNTIME_KEYS, as compact JSON. Rules pass it as
    ``params.cfg`` and on to ``indextts <command> --config``, so a change to any value a stage
    reads, and only those, reruns it."""
    out = {}
    for s in sections:
        skip = RUNTIME_KEYS.get(s, ())
        out[s] = {k: v for k, v in (config.get(s) or {}).items() if k not in skip}
    return json.dumps(out, sort_keys=True, separators=(",", ":"))


def runtime_config():
    """The RUNTIME_KEYS values of every section, as compact JSON (see RUNTIME)."""
    out = {
        s: {k: config[s][k] for k in keys if k in (config.get(s) or {})}
        for s, keys in RUNTIME_KEYS.items()
    }
    return json.dumps(out, sort_keys=True, separators=(",", ":"))


# A plain global, so shell commands can name it: its value is not a rerun trigger.
RUNTIME = runtime_config()


def code_id(*modules):
    """sha256 over the source of the library modules a stage runs (``"manifest"``,
    ``"model/"`` for a whole package ...). Passed as ``params.code`` so editing a module reruns
    exactly the stages that use it."""
    h = hashlib.sha256()
    for mod in modules:
        target = PKG / mod
        files = sorted(target.rglob("*.py")) if target.is_dir() else [target.with_suffix(".py")]
        for f in files:
            h.update(str(f.relative_to(PKG)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


# The small modules every stage imports.
CORE = ("config", "files")

RESULTS = "results"
LOGS = "logs"


def n_shards():
    return int(config["codes"]["n_shards"])


def shard_name(i):
    n = n_shards()
    return f"shard-{i:05d}-of-{n:05d}"


def all_targets():
    targets = [
        f"{RESULTS}/clean/summary.json",
        f"{RESULTS}/vocab/vocab_report.json",
        f"{RESULTS}/speakers/speakers.json",
    ]
    targets += extra_targets()
    return targets


# Later stages (codes, model) append their final outputs here from their own rule files.
_EXTRA_TARGETS = []


def extra_targets():
    return list(_EXTRA_TARGETS)


# Input functions of the rule files.


def get_manifests(wildcards):
    """The manifest files listed in data.manifests (plain paths or {path: ...} entries)."""
    return [m["path"] if isinstance(m, dict) else m for m in config["data"]["manifests"]]


def get_pretrained(wildcards):
    """The official gpt.pth / bpe.model named in the pretrained section (those that are set), so
    replacing either file reruns the gate."""
    pre = config.get("pretrained", {}) or {}
    return {f"pretrained_{k}": pre[k] for k in ("gpt", "bpe") if pre.get(k)}
