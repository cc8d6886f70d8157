"""What scoring a stage costs: wall seconds per sample and per audio second of the evaluation
rules on a finished demo run, by F0 method, with and without the reference's saved analyses.

Usage::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_evaluate.py --workdir /path/to/demo/run

``--workdir`` is a folder where the demo DAG has run (``make demo``, or ``snakemake`` in a copy of
the repository): its ``results/samples/`` and ``results/clean/`` are scored again into a temporary
folder, exactly as ``evaluate_reference`` and ``evaluate_stage`` do it (the paths in the sample
tables are relative to it). Reference measures only: the demo configures no ASR or speaker
model, and their cost on real hardware is estimated below from their size, not measured here.
Writes its section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.benchmarks_md import cpu_name, write_section  # noqa: E402

BEGIN, END = "<!-- bench_evaluate.py: begin -->", "<!-- bench_evaluate.py: end -->"


def _seconds(paths) -> float:
    import soundfile as sf

    return sum(sf.info(str(p)).duration for p in paths)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, type=Path, help="a folder where the demo DAG has run")
    p.add_argument("--stage", type=int, default=3, help="the stage whose samples are scored (default 3)")
    p.add_argument("--write", action=argparse.BooleanOptionalAction, default=True, help="update BENCHMARKS.md")
    a = p.parse_args(argv)

    import pandas as pd
    import torch

    from indextts.config import parse_section
    from indextts.evaluation.scoring import EvalConfig, evaluate_reference, evaluate_stage

    os.chdir(a.workdir)
    requests, clean = Path("results/samples/list.tsv"), Path("results/clean/clean.parquet")
    table = Path(f"results/samples/stage{a.stage}/samples.tsv")
    codec = Path("results/demo/codec/dac_tiny.pth")
    for f in (requests, clean, table, codec):
        if not f.is_file():
            sys.exit(f"{a.workdir / f}: missing; run the demo DAG there first")
    samples = pd.read_csv(table, sep="\t", keep_default_na=False)
    gen_seconds = _seconds(table.parent / f"{n}.wav" for n in samples["name"])
    real_seconds = _seconds(samples["reference"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("harvest", "dio"):
            cfg = parse_section(EvalConfig, {"acoustic": {"f0_method": method}}, "eval")
            t0 = time.perf_counter()
            ref = evaluate_reference(cfg, requests, out_dir=Path(tmp) / method / "ref", codec_weights=codec,
                                     clean=clean, log=lambda *_: None)
            t_ref = time.perf_counter() - t0
            t0 = time.perf_counter()
            evaluate_stage(cfg, table, out_dir=Path(tmp) / method / "cold", clean=clean, reference=ref,
                           log=lambda *_: None)
            t_cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            summary = evaluate_stage(cfg, table, out_dir=Path(tmp) / method / "warm", clean=clean, reference=ref,
                                     features=ref.parent / "features.npz", log=lambda *_: None)
            t_warm = time.perf_counter() - t0
            n_cands = int(summary["measures"]["retrieval_hit"]["n"])
            rows.append((method, t_ref, t_cold, t_warm, n_cands))
    n = len(samples)
    load = os.getloadavg()[0]
    lines = [
        BEGIN,
        "### Scoring a stage (`bench/bench_evaluate.py`)",
        "",
        f"Command: `OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_evaluate.py --workdir <demo run> --stage {a.stage}`  ",
        f"Machine: {cpu_name()}, `nproc` = {os.cpu_count()}, torch {torch.__version__}, "
        f"CPU; 1-min load average {load:.1f} at the end (a shared machine).",
        "",
        f"The demo's stage-{a.stage} samples: {n} clips, {gen_seconds:.1f} s generated, {real_seconds:.1f} s of real "
        f"recordings; `eval.candidates` 10, so each sample is compared with its real recording and up to 9 "
        "other recordings of its speaker (text retrieval). `evaluate_reference` writes the codec topline (encode + "
        "decode with the demo codec) and scores it and the floor; `evaluate_stage` scores one stage, cold (every "
        "real recording analysed again) or with the reference's `features.npz` (what the DAG does).",
        "",
        "| F0 method | evaluate_reference (s) | evaluate_stage, cold (s) | evaluate_stage, reused analyses (s) | per sample (s) | per generated audio second (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method, t_ref, t_cold, t_warm, _ in rows:
        lines.append(f"| {method} | {t_ref:.1f} | {t_cold:.1f} | {t_warm:.1f} | {t_warm / n:.2f} | "
                     f"{t_warm / gen_seconds:.3f} |")
    lines += [
        "",
        "WORLD analysis dominates: harvest (the default: better voicing decisions) costs about four times "
        "dio's. Reusing the real recordings' analyses leaves each stage the generated clips and the DTWs.",
        "",
        "Model-based measures, when configured, add per audio second (estimates from parameter counts, "
        "not measured here: no model hub is reachable): Whisper large-v3 (1.55 B parameters) about 5e11 FLOP "
        "per audio second for 5-s clips (encoder over the padded 30-s window, amortised, plus decoding), a few "
        "seconds per clip on a CPU and well under 0.1 s on a GPU; wavlm-base-plus-sv (95 M) about 1.5e10 FLOP "
        "per audio second. `eval.device: auto` runs them on CUDA when torch sees it and the rules then hold "
        "`gpu=1`.",
        END,
    ]
    text = "\n".join(lines)
    print(text)
    if a.write:
        write_section(text, BEGIN, END, anchor="<!-- bench_synthesize.py: end -->")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
