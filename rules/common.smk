# Helpers shared by the rules/*.smk files (config validation, stage configs and code identity for
# exact reruns, output paths). No rule logic lives here beyond get_* input functions.
import hashlib
import json
import os
import shlex
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.logging import logger
from snakemake.utils import validate

# Checked before any job runs: an unknown key or a wrong type stops the DAG and names the key.
# Defaults from the schema are filled in, so every rule sees the complete section.
validate(config, workflow.source_path("../schemas/config.schema.yaml"), set_default=True)

# Where this config's run writes (the run section): every output under RESULTS, every log under
# LOGS. One folder per config keeps a run from reading or overwriting another config's outputs.
RESULTS = os.path.normpath(config["run"]["results_dir"])
LOGS = os.path.normpath(config["run"]["logs_dir"])

# The clean table every later stage reads. With the ASR filter on (asr_filter.enabled,
# rules/asr_filter.smk), clean_manifest writes PRE_ASR and the filter's merge writes CLEAN from
# it; off, clean_manifest writes CLEAN itself and no rule of the filter exists.
ASR_FILTER = bool(config["asr_filter"]["enabled"])
CLEAN = f"{RESULTS}/clean/clean.parquet"
# Stage 2 trains on base-language (data.replay) rows: its speaker classifier counts their speakers.
STAGE2_REPLAY = (
    bool(config["data"].get("replay"))
    and float(config["train"]["stage2"].get("replay_ratio") or 0) > 0
)
PRE_ASR = f"{RESULTS}/clean/pre_asr.parquet"

# What the demo rules write when demo.enabled (rules/demo.smk, rules/codes.smk): config.yaml names
# these files as data.manifests and codec.weights, so the input check below exempts them.
DEMO_MANIFEST = f"{RESULTS}/demo/corpus/manifest.jsonl"
DEMO_CODEC = f"{RESULTS}/demo/codec/dac_tiny.pth"
GENERATED_INPUTS = {DEMO_MANIFEST, DEMO_CODEC} if config["demo"]["enabled"] else set()

# The folder of a local facebook/w2v-bert-2.0 (codec.w2v_bert): the files extract_codes reads.
W2V_BERT_FILES = ("config.json", "preprocessor_config.json", "*.safetensors")
# The released BigVGAN folder (pretrained.bigvgan): what the semantic voice loads from it.
BIGVGAN_FILES = ("config.json", "bigvgan_generator.pt")
# The released files after the GPT, with which a semantic-code stage is heard.
VOICE_KEYS = ("s2mel", "campplus", "bigvgan")


def semantic_only(cfg):
    """``required`` of a key the semantic codec needs and DAC never reads."""
    return True if cfg["codec"]["kind"] == "semantic" else None


def asr_filter_model_required(cfg):
    """``required`` of asr_filter.asr.path: unread with the filter off; needed when eval.asr.path
    (which the filter falls back to) is not set either."""
    if not cfg["asr_filter"]["enabled"]:
        return None
    return not cfg["eval"]["asr"]["path"]


# Every file or folder the config names, checked when the DAG is built (check_configured_inputs).
# Snakemake leaves a job out of the DAG when its outputs exist, without looking at its inputs or
# params: a config naming a manifest or codec that is not there would silently run on whatever
# another config left in the results folder. One row per key, so adding a key is one line
# (eval.asr.path, pretrained.s2mel ...): (dotted key, kind, required).
#   kind: "file", "folder", or the names/globs a folder must hold.
#   required: True (null or empty is an error), False (checked when set), or a function of the
#   config returning one of those, or None when this config does not read the key.
CONFIGURED_INPUTS = (
    ("data.manifests", "file", True),
    ("data.replay", "file", False),
    ("codec.weights", "file", True),
    ("codec.w2v_bert", W2V_BERT_FILES, semantic_only),
    ("codec.w2v_bert_stats", "file", semantic_only),
    ("vocab.base_model", "file", lambda cfg: cfg["vocab"]["mode"] == "extend"),
    ("pretrained.gpt", "file", False),
    ("pretrained.bpe", "file", False),
    ("pretrained.config", "file", False),
    ("pretrained.s2mel", "file", False),
    ("pretrained.campplus", "file", False),
    ("pretrained.bigvgan", BIGVGAN_FILES, False),
    ("eval.asr.path", "folder", False),
    ("asr_filter.asr.path", ("config.json",), asr_filter_model_required),
    ("eval.speaker.path", "folder", False),
)


# What a "not set" line adds for a key that another key can stand in for.
NOT_SET_HINTS = {"asr_filter.asr.path": " (nor eval.asr.path, which the ASR filter falls back to)"}


def configured_paths(key):
    """``(label, path)`` for each path the config gives at dotted ``key``: one for a plain key,
    one per entry of a list (``data.manifests[1].path`` for a ``{path: ...}`` entry), none when
    the key is null, empty or absent (a section the schema does not have yet)."""
    value = config
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, (list, tuple)):
        out = []
        for i, v in enumerate(value):
            if isinstance(v, dict):
                out.append((f"{key}[{i}].path", v.get("path")))
            else:
                out.append((f"{key}[{i}]", v))
        return [(label, p) for label, p in out if p]
    return [(key, value)] if value else []


def missing_input(path, kind):
    """Why ``path`` is not a usable ``kind`` (see CONFIGURED_INPUTS), or None when it is."""
    p = Path(path)
    if kind == "file":
        if p.is_file():
            return None
        return "is a folder, not a file" if p.is_dir() else "no such file"
    if not p.is_dir():
        return "is a file, not a folder" if p.exists() else "no such folder"
    if kind == "folder":
        return None
    lacking = [name for name in kind if not any(p.glob(name))]
    return f"has no {', '.join(lacking)}" if lacking else None


def check_configured_inputs():
    """Stop the run before any job when a file or folder of CONFIGURED_INPUTS is missing,
    naming every key and path at once. Paths a rule of this DAG writes (GENERATED_INPUTS, the
    demo's inputs) are exempt.

    Raises:
        WorkflowError: listing each missing key with its path, and what to do.
    """
    problems = []
    for key, kind, required in CONFIGURED_INPUTS:
        if callable(required):
            required = required(config)
        if required is None:
            continue
        paths = configured_paths(key)
        if required and not paths:
            problems.append(f"{key}: not set{NOT_SET_HINTS.get(key, '')}")
        for label, path in paths:
            if os.path.normpath(path) in GENERATED_INPUTS:
                continue
            why = missing_input(path, kind)
            if why:
                problems.append(f"{label}: {path}: {why}")
    if not problems:
        return
    lines = ["Inputs named by the config are missing, so no job runs:"]
    lines += [f"  {p}" for p in problems]
    if config["demo"]["enabled"]:
        lines.append(
            f"demo.enabled: the demo writes its manifest to {DEMO_MANIFEST} and its codec to"
            f" {DEMO_CODEC} (under run.results_dir); data.manifests and codec.weights may name them."
        )
    lines.append(
        'Point each key at the file or folder on disk (README, "Your own corpus") and run again'
        f" (relative paths are read from {os.getcwd()})."
    )
    raise WorkflowError("\n".join(lines))


check_configured_inputs()

PKG = Path(workflow.basedir) / "indextts"
# Where envs/indextts.post-deploy.sh finds this package to install it into the conda env of
# `--sdm conda` (Snakemake copies the env files away from the repository before using them).
os.environ.update(INDEXTTS_SOURCE=str(Path(workflow.basedir)))


# Knobs that cannot change a result (worker counts, speed-only batching, logging, progress):
# kept out of the tracked params so changing them reruns nothing. Rules hand them to the CLI as
# ``params: runtime=runtime_params`` + ``--runtime {params.runtime:q}``; the library merges
# them back onto --config.
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
    # A row's samples do not depend on the batch it is generated in (tested), so batch_size is speed only.
    "synthesize": ("batch_size",),
}

# Keys only the export (pretrained.config) or synthesis (the voice files, passed as inputs) reads:
# left out of every stage's params (stage_config), so pointing pretrained.config at the released
# config.yaml reruns the export and nothing else, and the voice files only re-speak the samples.
EXPORT_KEYS = {"pretrained": ("config",)}
SYNTHESIS_KEYS = {"pretrained": VOICE_KEYS}


def stage_config(*sections, unread=()):
    """The config sections a stage reads, less RUNTIME_KEYS, as compact JSON. Rules pass it as
    ``params.cfg`` and on to ``indextts <command> --config``, so a change to any value a stage
    reads, and only those, reruns it. ``unread``: ``"section.key"`` entries of those sections
    that this stage does not read (they keep their defaults in the library)."""
    out = {}
    for s in sections:
        skip = (*RUNTIME_KEYS.get(s, ()), *EXPORT_KEYS.get(s, ()), *SYNTHESIS_KEYS.get(s, ()))
        skip += tuple(u.split(".", 1)[1] for u in unread if u.startswith(f"{s}."))
        out[s] = {k: v for k, v in (config.get(s) or {}).items() if k not in skip}
    return json.dumps(out, sort_keys=True, separators=(",", ":"))


def train_config(stage, *sections):
    """``stage_config(*sections)`` plus the train section for one stage: the shared settings
    and that stage's subsection only, so changing stage 3's learning rate reruns stage 3 alone."""
    out = json.loads(stage_config(*sections))
    others = {f"stage{k}" for k in (1, 2, 3) if k != stage}
    skip = set(RUNTIME_KEYS.get("train", ())) | others
    out["train"] = {k: v for k, v in config["train"].items() if k not in skip}
    return json.dumps(out, sort_keys=True, separators=(",", ":"))


def runtime_config():
    """The RUNTIME_KEYS values of every section, as compact JSON (see RUNTIME), and the voice files
    (SYNTHESIS_KEYS): training records them in the stage folder for a later ``indextts synthesize``
    without them being a reason to retrain."""
    out = {
        s: {k: config[s][k] for k in keys if k in (config.get(s) or {})}
        for s, keys in (*RUNTIME_KEYS.items(), *SYNTHESIS_KEYS.items())
    }
    return json.dumps(out, sort_keys=True, separators=(",", ":"))


RUNTIME = runtime_config()


def runtime_params(wildcards, resources):
    """``params: runtime=runtime_params``: the RUNTIME JSON. Snakemake leaves params computed by
    a function of resources (or input/output/threads) out of its params rerun trigger, so the
    knobs reach the command without making a changed knob rerun anything."""
    return RUNTIME


def folder_of(key):
    """``params: x=folder_of("meta")``: the folder of a named input/output file (the checkpoint
    folder of a stage), derived from the file rather than hard-coded."""

    def get(wildcards, input, output):
        files = output if key in output.keys() else input
        return str(Path(files[key]).parent)

    return get


# --- training -------------------------------------------------------------------------------


def train_gpus():
    """GPUs a training job holds: none when the config pins training to the CPU."""
    return 0 if config["train"]["device"] == "cpu" else int(config["train"]["gpus"])


def train_launcher(wildcards, resources):
    """``params: launch=train_launcher``: how a training job starts its processes. One process
    for one GPU; ``torchrun --standalone`` over the ``train.gpus`` GPUs of one node; with the SLURM
    resource ``nodes`` > 1 (README "On a SLURM cluster"), one task per node through ``srun``, each
    a torchrun joining a c10d rendezvous on the allocation's first node. A function of resources,
    so it is not a rerun trigger itself: train.gpus is in the stage's params already."""
    n = int(config["train"]["gpus"])
    nodes = int(resources.get("nodes", 1) or 1)
    if nodes > 1:
        head = '$(scontrol show hostnames "$(squeue -h -j "$SLURM_JOB_ID" -o %N)" | head -n 1)'
        return (
            f"srun --nodes={nodes} --ntasks={nodes} --ntasks-per-node=1"
            f" torchrun --nnodes={nodes} --nproc-per-node={n} --rdzv-backend=c10d"
            f' --rdzv-id="$SLURM_JOB_ID" --rdzv-endpoint={head}:29500 -m indextts'
        )
    if n > 1:
        return f"torchrun --standalone --nproc-per-node={n} -m indextts"
    return "indextts"


def train_mem_mb():
    """Host memory of a training job: the released size holds its weights, optimizer and loaders."""
    return 64000 if config["model"]["preset"] == "indextts2" else 8000


def stage_outputs(stage):
    """The outputs of a training stage: its checkpoint folder's weights, model.json, metrics."""
    folder = f"{RESULTS}/train/stage{stage}"
    return {
        "weights": f"{folder}/model.safetensors",
        "meta": f"{folder}/model.json",
        "metrics": f"{folder}/metrics.jsonl",
    }


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
    """The manifest files listed in data.manifests and data.replay (plain paths or {path: ...}
    entries)."""
    entries = [*config["data"]["manifests"], *(config["data"].get("replay") or [])]
    return [m["path"] if isinstance(m, dict) else m for m in entries]


def get_pretrained(wildcards):
    """The official gpt.pth / bpe.model named in the pretrained section (those that are set), so
    replacing either file reruns the gate."""
    pre = config.get("pretrained", {}) or {}
    return {f"pretrained_{k}": pre[k] for k in ("gpt", "bpe") if pre.get(k)}


def get_codec_files(wildcards):
    """The files the codes depend on: the codec weights, and for the semantic codec the w2v-BERT
    folder's configs and weights and the statistics, so replacing any of them re-encodes."""
    codec = config["codec"]
    files = {"weights": codec["weights"]}
    if codec["kind"] == "semantic":  # check_configured_inputs has seen both set and there
        folder = Path(codec["w2v_bert"])
        files["w2v_bert"] = [str(p) for name in W2V_BERT_FILES for p in sorted(folder.glob(name))]
        files["w2v_bert_stats"] = codec["w2v_bert_stats"]
    return files


def features_arg(wildcards, input, output):
    """`` --features FILE(S)`` for the CLI when features are stored, else nothing."""
    import shlex

    files = output.get("features") or input.get("features") or []
    files = [files] if isinstance(files, str) else list(files)
    return (" --features " + " ".join(shlex.quote(str(f)) for f in files)) if files else ""


# --- synthesis, export, report ----------------------------------------------------------------


SEMANTIC_CODES = config["codec"]["kind"] == "semantic"


def voice_configured():
    """Semantic codes are heard through the released s2mel, CAM++ and BigVGAN: all three set."""
    pre = config.get("pretrained") or {}
    return all(pre.get(k) for k in VOICE_KEYS)


def sample_stages():
    """The training stages that speak the sample set (samples.stages). Semantic-code stages speak
    through pretrained.s2mel, campplus and bigvgan; without them none do (said once, below)."""
    if SEMANTIC_CODES and not voice_configured():
        return []
    return [int(k) for k in config["samples"]["stages"]]


SAMPLE_STAGES = sample_stages()
if SEMANTIC_CODES and config["samples"]["stages"] and not SAMPLE_STAGES:
    logger.warning(
        "codec.kind is semantic but pretrained."
        + ", pretrained.".join(k for k in VOICE_KEYS if not (config.get("pretrained") or {}).get(k))
        + " not set: the stages will not be heard (no samples, no evaluation). Set them to the released "
        "s2mel.pth, campplus_cn_common.bin and bigvgan_v2_22khz_80band_256x folder."
    )


def get_voice_files(wildcards):
    """The released files a semantic-code stage speaks through (none for DAC): s2mel, CAM++,
    BigVGAN and the w2v-BERT files the prompts go through, so replacing one re-speaks the samples.
    """
    if not SEMANTIC_CODES:
        return {}
    pre = config["pretrained"]
    codec_files = get_codec_files(wildcards)
    return {
        "s2mel": pre["s2mel"],
        "campplus": pre["campplus"],
        "bigvgan": [str(Path(pre["bigvgan"]) / name) for name in BIGVGAN_FILES],
        "w2v_bert": codec_files["w2v_bert"],
        "w2v_bert_stats": codec_files["w2v_bert_stats"],
    }


def voice_args(wildcards, input, output):
    """The synthesize CLI's semantic flags: the voice files and the per-stage topline folder."""
    if not SEMANTIC_CODES:
        return ""
    folder = str(Path(input.bigvgan[0]).parent)
    return (
        f" --s2mel {shlex.quote(input.s2mel)} --campplus {shlex.quote(input.campplus)}"
        f" --bigvgan {shlex.quote(folder)} --topline-dir {shlex.quote(str(Path(output.topline[0]).parent))}"
    )


def sample_names():
    """The sample WAV stems, as indextts.synthesize.sample_names builds them."""
    s = config["samples"]
    return [
        f"{kind}-{i:02d}"
        for kind in ("same", "cross", "novel", "base")
        for i in range(int(s.get(f"n_{kind}", 0)))
    ]


def synthesize_gpus():
    """GPUs a synthesis job holds: none when the config pins synthesis to the CPU."""
    return 0 if config["synthesize"]["device"] == "cpu" else 1


def export_config():
    """What the export reads of the config (EXPORT_KEYS), as compact JSON for ``params.cfg``."""
    out = {s: {k: (config.get(s) or {}).get(k) for k in keys} for s, keys in EXPORT_KEYS.items()}
    return json.dumps(out, sort_keys=True, separators=(",", ":"))


def get_released_config(wildcards):
    """The released config.yaml the export keeps (pretrained.config), when set."""
    path = (config.get("pretrained") or {}).get("config")
    return {"released_config": path} if path else {}


def transfer_arg(wildcards):
    """`` --transfer FILE`` for stage 1: the transfer report train_stage1 writes beside its weights
    when it imported pretrained.gpt (not a declared output, so not an input; read if present)."""
    if int(wildcards.stage) == 1:
        return f" --transfer {RESULTS}/train/stage1/transfer_report.json"
    return ""


def report_stage_category(wildcards):
    """The report category of a stage's pieces, numbered so categories sort in pipeline order."""
    return f"{int(wildcards.stage) + 1}. Stage {wildcards.stage}"


# --- the ASR filter ---------------------------------------------------------------------------


def asr_filter_asr():
    """The ASR section the filter transcribes with: its own, or eval.asr's when its path is null."""
    own = config["asr_filter"]["asr"]
    return own if own["path"] else config["eval"]["asr"]


def asr_filter_config(step):
    """``params.cfg`` of the filter's rules. ``transcribe``: what a transcript depends on (the ASR
    section in use less its batch_size, the device, the VAD threshold); ``merge``: the thresholds
    and the text section CER is scored through. So a threshold re-filters, never re-transcribes."""
    f = config["asr_filter"]
    if step == "merge":
        out = {
            "asr_filter": {k: f[k] for k in ("max_cer", "min_edge_silence")},
            "text": config["text"],
        }
    else:
        asr = {k: v for k, v in asr_filter_asr().items() if k != "batch_size"}
        out = {"asr_filter": {"device": f["device"], "vad_threshold": f["vad_threshold"]}}
        if f["asr"]["path"]:
            out["asr_filter"]["asr"] = asr
        else:
            out["eval"] = {"asr": asr}
    return json.dumps(out, sort_keys=True, separators=(",", ":"))


def get_asr_filter_model(wildcards):
    """The ASR folder's files (indextts.asr_filter.model_files), so replacing one re-transcribes."""
    folder = Path(asr_filter_asr()["path"])
    return sorted(str(p) for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def asr_filter_batch_size(wildcards, resources):
    """``params: batch_size=asr_filter_batch_size``: clips per ASR pass, speed only (a transcript
    does not depend on its batch), so a function of resources: not a rerun trigger."""
    return int(asr_filter_asr()["batch_size"])


def asr_filter_cache(wildcards, resources):
    """``params: cache=asr_filter_cache``: the transcripts kept across reruns (not an output, so
    Snakemake never deletes it): a rerun of a shard transcribes only clips it has not seen. Where a
    run writes is in no rule's params, so a function of resources."""
    return f"{RESULTS}/asr_filter/cache"


def asr_filter_gpus():
    """GPUs a transcription job holds: none when the config pins the filter's ASR to the CPU."""
    return 0 if config["asr_filter"]["device"] == "cpu" else 1


# --- evaluation -------------------------------------------------------------------------------


def eval_config(keys=None, unread=(), extra=None):
    """``params.cfg`` of an evaluation rule: the eval section (only ``keys`` when given, less the
    ``unread`` ``"eval.key"`` entries), the text section (the normaliser CER scores through), and
    ``extra`` ``{section: (key, ...)}`` picks of other sections."""
    out = json.loads(stage_config("eval", "text", unread=unread))
    if keys is not None:
        out["eval"] = {k: v for k, v in out["eval"].items() if k in keys}
        del out["text"]
    for section, picked in (extra or {}).items():
        out[section] = {k: (config.get(section) or {}).get(k) for k in picked}
    return json.dumps(out, sort_keys=True, separators=(",", ":"))


def eval_models():
    """The local model folders the evaluation is configured with (eval.asr.path, eval.speaker.path)."""
    ev = config.get("eval") or {}
    return {k: ev[k]["path"] for k in ("asr", "speaker") if (ev.get(k) or {}).get("path")}


def get_eval_models(wildcards):
    """The configured model folders as inputs, so replacing a model reruns the scores it gives."""
    return list(eval_models().values())


def eval_gpus():
    """GPUs an evaluation job holds: one for the ASR and speaker models, when configured and not
    pinned to the CPU; the reference measures alone run on the CPU."""
    return 1 if eval_models() and config["eval"]["device"] != "cpu" else 0


def probe_gpus():
    """GPUs a probe job holds: the released-size model embeds on a GPU; the tiny ones on the CPU."""
    big = config["model"]["preset"] == "indextts2"
    return 1 if big and config["eval"]["device"] != "cpu" else 0


# Stages whose samples are scored (those that speak them), and stages whose conditioners are probed
# (the probe computes log-mel prompt features: DAC models).
EVAL_STAGES = SAMPLE_STAGES
PROBE_STAGES = (1, 2, 3) if config["codec"]["kind"] == "dac" else ()
