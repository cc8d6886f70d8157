"""Does a trained stage read the text? Its val code loss with each utterance's own text against
the same utterances with another utterance's text.

    .venv/bin/python bench/bench_text_use.py RUN [RUN ...] [--stages 1 3] [--results results]

RUN is a workflow folder after training (its ``results/`` holds ``train/stageN``, ``codes``,
``tokens``, ``vocab/bpe.model`` and ``clean/clean.parquet``). Every val utterance of the codes pack
is teacher-forced through the stage's GPT in groups of 8, once as it is and once with the text ids
of the next utterance of its group (codes, speaker and emotion prompts unchanged). A model that
reads the text predicts its codes better with the right text: the gap (other - own, nats per
code) is how much of the code loss the text explains. A gap near 0 means the model is an acoustic
language model of the prompt's voice that ignores the text, which is what issue 17's demo runs
show: their samples do not retrieve their text above chance. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def text_use(run: Path, stage: int, results: str = "results", group: int = 8) -> dict:
    import torch

    from indextts.checkpoint import load_checkpoint
    from indextts.data import collate
    from indextts.train.loading import stage_datasets
    from indextts.train.preflight import StageInputs
    from indextts.train.settings import TrainConfig

    r = run / results
    model, meta = load_checkpoint(r / "train" / f"stage{stage}", vocab_path=r / "vocab/bpe.model")
    inputs = StageInputs(codes_index=r / "codes/index.json", clean=r / "clean/clean.parquet",
                         bpe=r / "vocab/bpe.model", out_dir=run / "unused", pack=r / "codes/pack", tokens=r / "tokens")
    tcfg = TrainConfig()
    _, val = stage_datasets(3, tcfg, model.cfg, inputs, None, lambda m: None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the prompt crops
        items = [val[i] for i in range(len(val))]
    sums = {"own": [0.0, 0.0], "other": [0.0, 0.0]}
    frames = 0
    with torch.no_grad():
        for s in range(0, len(items) - group + 1, group):
            part = items[s:s + group]
            swapped = [dict(it, text_ids=part[(j + 1) % group]["text_ids"]) for j, it in enumerate(part)]
            for name, rows in (("own", part), ("other", swapped)):
                batch = collate(rows)
                out = model(**batch.inputs())
                n = float(batch.code_lengths.sum())
                per_cb = getattr(out, "mel_losses", None)
                cb0 = float(per_cb[0]) if per_cb is not None else float(out.mel_loss)
                sums[name][0] += float(out.mel_loss) * n
                sums[name][1] += cb0 * n
            frames += int(batch.code_lengths.sum())
    own, other = (sums[k][0] / frames for k in ("own", "other"))
    own0, other0 = (sums[k][1] / frames for k in ("own", "other"))
    return {"run": run.name, "stage": stage, "utterances": len(items) - len(items) % group, "frames": frames,
            "own": own, "other": other, "gap": other - own, "own_cb0": own0, "other_cb0": other0,
            "gap_cb0": other0 - own0, "preset": meta.get("model", {}).get("preset", "?")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--stages", type=int, nargs="+", default=[1, 3])
    p.add_argument("--results", default="results", help="run.results_dir of the runs (default results)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    print("| run | stage | val utterances | code loss, own text | other text | gap | cb0 own | cb0 other | cb0 gap |")
    print("|---|---|---|---|---|---|---|---|---|")
    for run in a.runs:
        for stage in a.stages:
            if not (run / a.results / "train" / f"stage{stage}" / "model.json").is_file():
                continue
            try:
                t = text_use(run, stage, a.results)
            except (OSError, ValueError) as e:  # DataError is a ValueError: a folder of another version
                print(f"| {run.name} | {stage} | skipped: {str(e)[:100]} | | | | | | |", flush=True)
                continue
            print(f"| {t['run']} | {stage} | {t['utterances']} | {t['own']:.4f} | {t['other']:.4f} | {t['gap']:+.4f} "
                  f"| {t['own_cb0']:.4f} | {t['other_cb0']:.4f} | {t['gap_cb0']:+.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
