"""Replay on the demo: does ``train.stageN.replay_ratio`` keep a base language's val code loss down?

    .venv/bin/python bench/bench_replay.py [--work /tmp/bench-replay] [--replay-utterances 120] [--ratio 0.1]

The demo (config.yaml: 360 Amharic utterances, the committed demo codec, the tiny GPT and its
three stages) is run twice on a copy of the workflow, with the same ``data.replay`` manifest: an
English espeak-ng corpus of the same six voice variants (``en+<variant>``, other speaker names),
written here. The first run trains at replay ratio 0 (the replay rows are cleaned, extracted and
validated, never trained on), the second at ``--ratio`` in all three stages; the data stages run
once and only the training stages rerun. Reported: the val text and code loss of each language
at the end of each stage (the last ``split: val`` record of the stage's ``metrics.jsonl``).

The demo has no pretrained base model, so this measures what replay buys a base language
that the starting model does not already speak (its codes learned or not), not forgetting from a
released checkpoint. The Amharic vocabulary would read English text as ``<unk>``, so the runs
set ``vocab.byte_fallback`` (English letters become byte pieces, as a base vocabulary's pieces
would cover them in ``vocab.mode: extend``) with room for the bytes (``vocab.vocab_size`` 640).
The table goes to stdout and to BENCHMARKS.md (``--no-write`` leaves that alone).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.benchmarks_md import cpu_name, write_section  # noqa: E402
from indextts.demo import EMOTIONS, SPEAKERS  # noqa: E402
from tests.workflow_util import copy_workflow, deep_update, snakemake  # noqa: E402

# Plain English of about the demo's lengths (1-5 s spoken).
ENGLISH = (
    "Good morning, how are you today?",
    "The weather is very nice this afternoon.",
    "Let us go to the cafe for a cup of coffee.",
    "The children are learning at school.",
    "The city is quiet late at night.",
    "Please close the door when you leave.",
    "My mother cooked a wonderful dinner.",
    "We walked along the river for an hour.",
    "The train to the capital leaves at noon.",
    "Water is important for every living thing.",
    "He reads a new book every week.",
    "The market is busy on Saturday mornings.",
    "Thank you very much for your help.",
    "She plays the piano beautifully.",
    "The mountains are covered in snow.",
    "I will call you again tomorrow.",
    "The library opens early in the morning.",
    "Our team won the game last night.",
    "Birds sing in the garden at sunrise.",
    "The doctor said I should rest for a while.",
    "Fresh bread smells wonderful.",
    "They built a small house near the lake.",
    "Where did you put the keys?",
    "The museum has many old paintings.",
)
SECONDS = (1.2, 5.8)
BEGIN, END = "<!-- bench_replay.py: begin -->", "<!-- bench_replay.py: end -->"
ANCHOR = "<!-- bench_data.py: end -->"


def english_replay(out_dir: Path, n: int, seed: int) -> Path:
    """``n`` English utterances of the demo's voice variants (``en+<variant>``) and emotions,
    as a manifest.jsonl under ``out_dir`` (language en)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SystemExit("espeak-ng is not on PATH (make install puts it there)")
    rng = np.random.default_rng(seed)
    voices, emotions = SPEAKERS[:6], ("neutral", "happy", "sad")
    rows = []
    for i in range(n):
        voice, emotion = voices[i % len(voices)], emotions[(i // len(voices)) % len(emotions)]
        p = EMOTIONS[emotion]
        args = ["-v", f"en+{voice.variant}", "-p", str(int(np.clip(voice.pitch + p.pitch_offset, 0, 99))),
                "-s", str(int(round(voice.speed * p.speed_factor))), "-a", str(p.amplitude)]
        spk = "en_" + voice.variant
        path = out_dir / "wavs" / spk / f"{spk}_{i:04d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        for j in rng.permutation(len(ENGLISH)):
            subprocess.run([exe, *args, "-w", str(path), "--stdin"], input=ENGLISH[j].encode(), check=True,
                           capture_output=True)
            info = sf.info(path)
            if SECONDS[0] <= info.frames / info.samplerate <= SECONDS[1]:
                break
        else:
            raise SystemExit(f"no English sentence fits {SECONDS} s for {spk}")
        rows.append({"id": path.stem, "audio": str(path.relative_to(out_dir)), "text": ENGLISH[j], "speaker": spk,
                     "emotion": emotion, "language": "en"})
    manifest = out_dir / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return manifest


def last_val(metrics: Path) -> dict:
    vals = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    vals = [v for v in vals if v.get("split") == "val"]
    return vals[-1] if vals else {}


def run(work: Path, ratio: float, overrides: dict) -> tuple[dict, float]:
    cfg = yaml.safe_load((work / "config.yaml").read_text())
    deep_update(cfg, overrides)
    for k in (1, 2, 3):
        cfg["train"][f"stage{k}"]["replay_ratio"] = ratio
    (work / "config.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True, sort_keys=False))
    t0 = time.perf_counter()
    targets = [f"results/train/stage{k}/model.json" for k in (1, 2, 3)]
    snakemake(work, "--printshellcmds", *targets, timeout=7200)  # a flag first: targets are not --resources
    wall = time.perf_counter() - t0
    return {k: last_val(work / f"results/train/stage{k}/metrics.jsonl") for k in (1, 2, 3)}, wall


def section(results: dict, walls: dict, n_replay: int, ratio: float) -> str:
    """The BENCHMARKS.md section: the command, the machine, the table."""
    cmd = " ".join(["python", "bench/bench_replay.py", *sys.argv[1:]])
    lines = [BEGIN, "## Replay on the demo (`bench/bench_replay.py`)", "",
             f"`{cmd}` on {cpu_name()} ({os.cpu_count()} cores): the demo (config.yaml: 360 Amharic "
             f"utterances, tiny GPT, stages 600 / 60 / 60 steps) with {n_replay} English espeak-ng utterances of the "
             "same voice variants as `data.replay` (other speaker names; `vocab.byte_fallback`, vocab_size 640), "
             f"trained at replay_ratio 0 and {ratio} in every stage. Val losses (nats per token) at the end of each "
             "stage, per language (`lang/<language>/...` of the last val record). Wall time: "
             + ", ".join(f"{walls[r] / 60:.1f} min at {r}" for r in walls)
             + " (the first run includes the data stages; the second reruns only training).", "",
             "| stage | replay_ratio | am val code loss | en val code loss | am val text loss | en val text loss |",
             "|---|---|---|---|---|---|"]
    for k in (1, 2, 3):
        for r, res in results.items():
            v = res[k]
            cells = [v.get(key) for key in ("lang/am/mel_loss", "lang/en/mel_loss", "lang/am/text_loss",
                                            "lang/en/text_loss")]
            lines.append(f"| {k} | {r} | " + " | ".join("—" if c is None else f"{c:.3f}" for c in cells) + " |")
    lines += ["", "The demo starts from scratch, so the base language is one the starting model never spoke: "
              "this shows what replay buys a base language, not forgetting from a released checkpoint.", END]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench-replay"))
    ap.add_argument("--replay-utterances", type=int, default=120)
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--no-write", action="store_true", help="print the table only, leave BENCHMARKS.md alone")
    a = ap.parse_args()
    shutil.rmtree(a.work, ignore_errors=True)
    a.work.mkdir(parents=True)
    copy_workflow(a.work)
    manifest = english_replay(a.work / "replay", a.replay_utterances, seed=7)
    overrides = {
        "data": {"replay": [{"path": str(manifest), "language": "en"}]},
        "vocab": {"byte_fallback": True, "vocab_size": 640},
    }
    results, walls = {}, {}
    for ratio in (0.0, a.ratio):
        results[ratio], walls[ratio] = run(a.work, ratio, overrides)
        print(f"replay_ratio {ratio}: {walls[ratio] / 60:.1f} min", flush=True)
    print(section(results, walls, a.replay_utterances, a.ratio))
    if not a.no_write:
        write_section(section(results, walls, a.replay_utterances, a.ratio), BEGIN, END, anchor=ANCHOR)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
