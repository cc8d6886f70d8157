"""Full-size (indextts2 preset, ~871M parameters) official gpt.pth round trip, timed.

Builds a random indextts2-shaped model, writes it as an official gpt.pth, imports that into a
second fresh model, exports again and compares every tensor; then saves and loads our checkpoint
format. Prints a Markdown section. Needs ~12 GB of RAM and ~8 GB of disk under --work.

    .venv/bin/python bench/bench_transfer.py --work /tmp/bench_transfer
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import resource
import shutil
import time
from pathlib import Path

import torch


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def make_bpe(path: Path, n: int) -> Path:
    import sentencepiece as spm

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(4000)]
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(20000)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=n, model_type="bpe",
                                   bos_id=0, eos_id=1, unk_id=2, pad_id=-1, minloglevel=2)
    path.write_bytes(buf.getvalue())
    return path


def main() -> None:
    from indextts.checkpoint import load_checkpoint, save_checkpoint
    from indextts.model import build_model, model_config
    from indextts.model.transfer import export_official, import_official, load_official_state_dict, save_official

    p = argparse.ArgumentParser()
    p.add_argument("--work", default="/tmp/bench_transfer")
    a = p.parse_args()
    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = []

    def step(name: str, t0: float) -> None:
        rows.append((name, time.perf_counter() - t0, rss_gb()))

    cfg = model_config("indextts2")
    t = time.perf_counter()
    torch.manual_seed(1)
    source = build_model(cfg)
    n_params = sum(p.numel() for p in source.parameters())
    step("build random indextts2 model", t)
    t = time.perf_counter()
    save_official(source, work / "gpt.pth")
    step(f"save_official -> gpt.pth ({(work / 'gpt.pth').stat().st_size / 1e9:.2f} GB)", t)
    del source

    t = time.perf_counter()
    torch.manual_seed(2)
    target = build_model(cfg)
    step("build second model", t)
    t = time.perf_counter()
    report = import_official(work / "gpt.pth", target)
    step(f"import_official ({len(report.loaded)} loaded, {len(report.reinitialised)} re-initialised)", t)
    t = time.perf_counter()
    original = load_official_state_dict(work / "gpt.pth").state
    again = export_official(target)
    same = list(again) == list(original) and all(torch.equal(again[k], original[k]) for k in original)
    step(f"export_official + compare with the file: {'identical' if same else 'DIFFERENT'}", t)
    del again, original

    bpe = make_bpe(work / "bpe.model", 12000)
    t = time.perf_counter()
    save_checkpoint(work / "ckpt", target, model_cfg=cfg, vocab_path=bpe, text_cfg={}, codec_cfg={},
                    stage="bench", training_type="full", parent_sha256=None, data_index_sha256=None, step=0)
    step(f"save_checkpoint ({(work / 'ckpt' / 'model.safetensors').stat().st_size / 1e9:.2f} GB, incl. sha256)", t)
    ref = {k: v.clone() for k, v in list(target.state_dict().items())[:5]}
    del target
    t = time.perf_counter()
    loaded, _ = load_checkpoint(work / "ckpt", vocab_path=bpe)
    step("load_checkpoint (build + load, size check)", t)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ref.items())
    shutil.rmtree(work, ignore_errors=True)

    print("### Official gpt.pth round trip at full size (`bench/bench_transfer.py`)\n")
    print(f"`.venv/bin/python bench/bench_transfer.py` on {os.cpu_count()}-core CPU, no GPU, "
          f"torch {torch.__version__}, Python {platform.python_version()}; indextts2 preset, "
          f"{n_params / 1e6:.0f}M parameters, fp32.\n")
    print("| step | seconds | peak RSS (GB) |\n|---|---:|---:|")
    for name, s, r in rows:
        print(f"| {name} | {s:.1f} | {r:.1f} |")
    print(f"\nRound trip identical: {same}.")


if __name__ == "__main__":
    main()
