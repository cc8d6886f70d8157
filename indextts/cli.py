"""``indextts <command> [args]``: one thin subcommand per library entrypoint.

Commands are looked up in a table and their module is imported only when run, so a quick
command (``select-speakers``) does not pay for importing torch. Each module's ``cli(argv)``
builds its own argparse parser.
"""

from __future__ import annotations

import importlib
import os
import sys

from indextts.config import ConfigError

# command -> (module, help). The module defines ``cli_<command with _>(argv) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo-corpus": ("indextts.demo", "synthesise the Amharic demo corpus with espeak-ng"),
    "clean-manifest": ("indextts.manifest", "clean manifests into clean/rejects Parquet + summary"),
    "asr-transcribe": ("indextts.asr_filter", "transcribe one shard of the clean table and measure its speech edges (ASR filter)"),
    "asr-filter": ("indextts.asr_filter", "score the transcripts (CER, cut speech) and split the clean table into kept and rejected rows"),
    "train-vocab": ("indextts.vocab", "train the SentencePiece vocabulary and its report"),
    "select-speakers": ("indextts.speakers", "choose the speakers for the stage-2 classifier"),
    "make-demo-codec": ("indextts.demo_codec", "write a tiny randomly initialised DAC for the demo"),
    "demo-codec": ("indextts.demo_codec", "train the demo's small DAC on the demo corpus and score it, or install the committed one"),
    "extract-codes": ("indextts.codes", "encode one shard of the clean manifest into codes (DAC or semantic)"),
    "index-codes": ("indextts.codes", "index the code shards and check frame counts"),
    "pack-codes": ("indextts.pack", "the training data cache of the code shards (memory-mappable numpy files)"),
    "tokenize-text": ("indextts.pack", "the codes pack's text as ids of one vocabulary (the cache training reads)"),
    "validate": ("indextts.validate", "check data, vocab and model end to end before training"),
    "train": ("indextts.train.cli", "train one stage (1, 2 or 3); resumes from its saved state"),
    "import-gpt": ("indextts.pretrained", "import an official gpt.pth into our checkpoint format"),
    "export-gpt": ("indextts.pretrained", "export a checkpoint to the official gpt.pth layout"),
    "synthesize": ("indextts.synthesize", "text in, WAV out, from one checkpoint folder (or a list)"),
    "sample-list": ("indextts.synthesize", "pick the fixed sample set every stage speaks"),
    "export": ("indextts.pretrained", "export the final stage for other tooling, with a re-import check"),
    "evaluate": ("indextts.evaluation.scoring", "score generated WAVs against their real recordings (MCD, F0, retrieval, CER, SIM)"),
    "evaluate-reference": ("indextts.evaluation.scoring", "score the codec topline, the floor and the real recordings"),
    "eval-summary": ("indextts.evaluation.scoring", "print the scores of evaluate's summary.json files"),
    "probe": ("indextts.evaluation.disentangle", "linear probes for speaker and emotion on a stage's emo_vec"),
    "report-data": ("indextts.report", "data summary, histograms and vocab report for the report"),
    "report-stage": ("indextts.report", "loss, speaker and throughput curves of one stage for the report"),
    "report-samples": ("indextts.report", "the samples page (playable audio) for the report"),
    "report-export": ("indextts.report", "the export report as a page of the report"),
    "report-eval": ("indextts.report", "the evaluation table and plots of every stage for the report"),
}


# Environment a command's process runs with, set before its module (and so polars) is imported;
# a variable already set in the environment wins. clean-manifest: polars' jemalloc keeps the pages
# it frees instead of handing them back to the kernel over ~10 s, so the next span's buffers reuse
# them instead of faulting fresh zeroed pages in. Cleaning 3M rows then takes about half the page
# faults (~490k -> ~260k), ~1 CPU-s less kernel time and ~1 s less wall time on 2 cores, at the
# same peak memory (BENCHMARKS.md). Commands that run for hours are left as they are.
COMMAND_ENV: dict[str, dict[str, str]] = {
    "clean-manifest": {"_RJEM_MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"},
}


def apply_command_env(name: str) -> None:
    """Set :data:`COMMAND_ENV` ``[name]``; it takes effect only before polars is first imported."""
    for key, value in COMMAND_ENV.get(name, {}).items():
        os.environ.setdefault(key, value)


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: indextts <command> [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run 'indextts <command> --help' for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from indextts import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"indextts: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    apply_command_env(name)
    module = importlib.import_module(COMMANDS[name][0])
    entry = getattr(module, "cli_" + name.replace("-", "_"))
    try:
        return int(entry(rest) or 0)
    except ConfigError as e:
        print(f"indextts {name}: {e}", file=sys.stderr)
        return 2
