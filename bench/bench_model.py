"""Forward+backward throughput of the UnifiedVoice presets; prints a Markdown section.

    .venv/bin/python bench/bench_model.py [--presets tiny small] [--codebooks 1 3 12] [--steps 10] [--threads 2]

Tokens/s counts non-pad text + code targets only (STYLE rule 7), code targets once per frame
(plus the stop) whatever the number of codebooks K, so K = 12 and K = 1 are compared on the
same speech. Batches are random ids and log-mel-sized features with lengths drawn per row, so
padding is realistic; every K sees the same lengths. Each (preset, K) is timed over ``--steps``
AdamW steps after two warm-up steps, the steps of the K values interleaved; the median step time
is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.benchmarks_md import cpu_name  # noqa: E402
from indextts.model import build_model, model_config  # noqa: E402
from indextts.model.flops import flops_per_token, per_token_params  # noqa: E402

# Per preset: batch size and (min, max) lengths of text tokens, code frames, conditioning frames.
# tiny: demo-like clips (1-6 s at 50 code frames/s, 6 s reference); small: 4-12 s clips.
SHAPES = {
    "tiny": dict(B=8, text=(20, 60), codes=(50, 300), cond=(100, 300)),
    "small": dict(B=8, text=(50, 150), codes=(200, 600), cond=(150, 300)),
}


def make_batch(cfg, B: int, text: tuple[int, int], codes: tuple[int, int], cond: tuple[int, int],
               g: torch.Generator, g_codes: torch.Generator) -> dict[str, torch.Tensor]:
    """Random ids; codes ``[B, n_codebooks, T]`` from their own generator, so that lengths, text and
    features do not depend on the number of codebooks."""
    def lengths(lo_hi):
        return torch.randint(lo_hi[0], lo_hi[1] + 1, (B,), generator=g)

    tl, cl, fl = lengths(text), lengths(codes), lengths(cond)
    return dict(
        text_ids=torch.randint(2, cfg.text_vocab_size, (B, int(tl.max())), generator=g),
        text_lengths=tl,
        codes=torch.randint(0, cfg.number_mel_codes - 2, (B, cfg.n_codebooks, int(cl.max())), generator=g_codes),
        code_lengths=cl,
        cond_feats=torch.randn(B, int(fl.max()), cfg.cond_feat_dim, generator=g),
        cond_lengths=fl,
    )


class _Run:
    """One (preset, K): its model, optimiser, batches and timings."""

    def __init__(self, preset: str, n_codebooks: int) -> None:
        torch.manual_seed(0)
        self.preset, self.K = preset, n_codebooks
        self.cfg = model_config(preset, n_codebooks=n_codebooks)
        self.model = build_model(self.cfg).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        g, g_codes = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
        self.batches = [make_batch(self.cfg, g=g, g_codes=g_codes, **SHAPES[preset]) for _ in range(4)]
        self.times, self.cpu, self.tokens, self.positions = [], [], [], []

    def step(self, i: int, timed: bool) -> None:
        b = self.batches[i % len(self.batches)]
        t0, c0 = time.perf_counter(), time.process_time()
        out = self.model(**b)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        self.opt.step()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if timed:
            self.times.append(dt)
            self.cpu.append(dc)
            self.tokens.append(int(out.n_text_tokens + out.n_mel_tokens))
            self.positions.append(b["text_ids"].shape[0] * self.cfg.seq_len(b["text_ids"].shape[1], b["codes"].shape[-1]))

    def result(self) -> dict:
        cfg, model = self.cfg, self.model
        tok_s = [n / t for n, t in zip(self.tokens, self.times)]
        pos_s = [n / t for n, t in zip(self.positions, self.times)]
        mean_seq = statistics.mean(self.positions) / SHAPES[self.preset]["B"]
        total = sum(p.numel() for p in model.parameters())
        cond = sum(p.numel() for n, p in model.named_parameters() if "conditioning_encoder" in n or "perceiver" in n)
        fpt = flops_per_token(cfg, int(mean_seq))
        cpu_per_token = statistics.median(c / n for c, n in zip(self.cpu, self.tokens))
        return dict(preset=self.preset, K=self.K, cpu_per_token=cpu_per_token, params=total, cond_params=cond, n=per_token_params(cfg),
                    B=SHAPES[self.preset]["B"], seq=mean_seq, step_s=statistics.median(self.times),
                    tok_s=statistics.median(tok_s), best_tok_s=max(tok_s), pos_s=statistics.median(pos_s), fpt=fpt,
                    gflops=fpt * max(pos_s) / 1e9)


def bench(preset: str, steps: int, codebooks: list[int]) -> list[dict]:
    """Time every K of ``codebooks`` on ``preset``, their steps interleaved (K = 1, 3, 12, 1, 3 ...),
    so that load from other processes on a shared machine falls on all of them alike."""
    runs = [_Run(preset, k) for k in codebooks]
    for i in range(steps + 2):
        for run in runs:
            run.step(i, timed=i >= 2)  # two warm-up steps excluded
    return [run.result() for run in runs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=sorted(SHAPES))
    ap.add_argument("--codebooks", nargs="+", type=int, default=[1, 3, 12], help="values of n_codebooks")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [r for p in args.presets for r in bench(p, args.steps, args.codebooks)]
    print("### UnifiedVoice forward+backward (CPU)\n")
    print(f"`.venv/bin/python bench/bench_model.py --codebooks {' '.join(map(str, args.codebooks))} "
          f"--steps {args.steps} --threads {args.threads}` on "
          f"{cpu_name()} ({os.cpu_count()} cores, no GPU), {torch.get_num_threads()} threads, torch {torch.__version__}, "
          "fp32, AdamW step included, random ids and features.\n")
    print("| preset | codebooks K | params (conditioners) | N per token | batch | mean GPT seq | median step | "
          "non-pad tokens/s median (best) | wall time per token vs K = 1, median (best) | CPU time per token vs K = 1 | GPT positions/s median | FLOPs/token (6N + 12·L·d·T) | "
          "model GFLOP/s (best) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    base = {r["preset"]: r for r in rows if r["K"] == 1}
    for r in rows:
        one = base.get(r["preset"])
        ratio = f"{one['tok_s'] / r['tok_s']:.2f}x ({one['best_tok_s'] / r['best_tok_s']:.2f}x)" if one else "-"
        cpu = f"{r['cpu_per_token'] / one['cpu_per_token']:.2f}x" if one else "-"
        print(f"| {r['preset']} | {r['K']} | {r['params'] / 1e6:.2f} M ({r['cond_params'] / 1e6:.2f} M) | "
              f"{r['n'] / 1e6:.2f} M | {r['B']} | {r['seq']:.0f} | {r['step_s'] * 1e3:.0f} ms | "
              f"{r['tok_s']:,.0f} ({r['best_tok_s']:,.0f}) | {ratio} | {cpu} | {r['pos_s']:,.0f} | {r['fpt'] / 1e6:.1f} M | "
              f"{r['gflops']:.1f} |")
    print("\nFLOPs/token is `indextts.model.flops.flops_per_token(cfg, mean GPT seq)`; model GFLOP/s applies it "
          "to all GPT positions (padding included, conditioners excluded), so it understates the work done. "
          "'best' is the fastest timed step, the least disturbed by other processes on a shared machine. "
          "CPU time per token (this process's CPU seconds, all threads, median over steps) is the least "
          "sensitive to other processes: the fairest K comparison on a shared machine.")
    # What the K heads cost at the released width, where a trainer spends its GPU time.
    seq = 600
    one, twelve = (model_config("indextts2", number_mel_codes=1026, n_codebooks=k) for k in (1, 12))
    print(f"\nAt the released size (`indextts2`, 16 kHz DAC codebook of 1024, GPT sequence {seq}), "
          f"`flops_per_token` gives {flops_per_token(one, seq) / 1e9:.2f} GFLOP for K = 1 and "
          f"{flops_per_token(twelve, seq) / 1e9:.2f} GFLOP for K = 12 "
          f"({flops_per_token(twelve, seq) / flops_per_token(one, seq):.3f}x): there the trunk dominates.")


if __name__ == "__main__":
    main()
