"""Forward+backward throughput of the UnifiedVoice presets; prints a Markdown section.

    .venv/bin/python bench/bench_model.py [--presets tiny small] [--steps 10] [--threads 2]

Tokens/s counts non-pad text + code targets only (STYLE rule 7). Batches are random ids and
log-mel-sized features with lengths drawn per row, so padding is realistic. Each preset is timed
over ``--steps`` AdamW steps after two warm-up steps; the median step time is reported.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from indextts.model import build_model, model_config
from indextts.model.flops import flops_per_token, per_token_params

# Per preset: batch size and (min, max) lengths of text tokens, code frames, conditioning frames.
# tiny: demo-like clips (1-6 s at 50 code frames/s, 6 s reference); small: 4-12 s clips.
SHAPES = {
    "tiny": dict(B=8, text=(20, 60), codes=(50, 300), cond=(100, 300)),
    "small": dict(B=8, text=(50, 150), codes=(200, 600), cond=(150, 300)),
}


def make_batch(cfg, B: int, text: tuple[int, int], codes: tuple[int, int], cond: tuple[int, int],
               g: torch.Generator) -> dict[str, torch.Tensor]:
    def lengths(lo_hi):
        return torch.randint(lo_hi[0], lo_hi[1] + 1, (B,), generator=g)

    tl, cl, fl = lengths(text), lengths(codes), lengths(cond)
    return dict(
        text_ids=torch.randint(2, cfg.text_vocab_size, (B, int(tl.max())), generator=g),
        text_lengths=tl,
        codes=torch.randint(0, cfg.number_mel_codes - 2, (B, int(cl.max())), generator=g),
        code_lengths=cl,
        cond_feats=torch.randn(B, int(fl.max()), cfg.cond_feat_dim, generator=g),
        cond_lengths=fl,
    )


def bench(preset: str, steps: int) -> dict:
    torch.manual_seed(0)
    cfg = model_config(preset)
    model = build_model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    shape = SHAPES[preset]
    batches = [make_batch(cfg, g=g, **shape) for _ in range(4)]
    times, tokens, positions = [], [], []
    for i in range(steps + 2):
        b = batches[i % len(batches)]
        t0 = time.perf_counter()
        out = model(**b)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        if i >= 2:  # warm-up steps excluded
            times.append(dt)
            tokens.append(int(out.n_text_tokens + out.n_mel_tokens))
            positions.append(b["text_ids"].shape[0] * cfg.seq_len(b["text_ids"].shape[1], b["codes"].shape[1]))
    tok_s = [n / t for n, t in zip(tokens, times)]
    pos_s = [n / t for n, t in zip(positions, times)]
    mean_seq = statistics.mean(positions) / shape["B"]
    total = sum(p.numel() for p in model.parameters())
    cond = sum(p.numel() for n, p in model.named_parameters() if "conditioning_encoder" in n or "perceiver" in n)
    fpt = flops_per_token(cfg, int(mean_seq))
    return dict(preset=preset, params=total, cond_params=cond, n=per_token_params(cfg), B=shape["B"],
                seq=mean_seq, step_s=statistics.median(times), tok_s=statistics.median(tok_s), best_tok_s=max(tok_s),
                pos_s=statistics.median(pos_s), fpt=fpt, gflops=fpt * max(pos_s) / 1e9)


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [bench(p, args.steps) for p in args.presets]
    print("### UnifiedVoice forward+backward (CPU)\n")
    print(f"`.venv/bin/python bench/bench_model.py --steps {args.steps} --threads {args.threads}` on "
          f"{cpu_name()} ({os.cpu_count()} cores, no GPU), {torch.get_num_threads()} threads, torch {torch.__version__}, "
          "fp32, AdamW step included, random ids and features.\n")
    print("| preset | params (conditioners) | N per token | batch | mean GPT seq | median step | "
          "non-pad tokens/s median (best) | GPT positions/s median | FLOPs/token (6N + 12·L·d·T) | "
          "model GFLOP/s (best) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['params'] / 1e6:.2f} M ({r['cond_params'] / 1e6:.2f} M) | {r['n'] / 1e6:.2f} M | "
              f"{r['B']} | {r['seq']:.0f} | {r['step_s'] * 1e3:.0f} ms | {r['tok_s']:,.0f} ({r['best_tok_s']:,.0f}) | "
              f"{r['pos_s']:,.0f} | {r['fpt'] / 1e6:.1f} M | {r['gflops']:.1f} |")
    print("\nFLOPs/token is `indextts.model.flops.flops_per_token(cfg, mean GPT seq)`; model GFLOP/s applies it "
          "to all GPT positions (padding included, conditioners excluded), so it understates the work done. "
          "'best' is the fastest timed step, the least disturbed by other processes on a shared machine.")


if __name__ == "__main__":
    main()
