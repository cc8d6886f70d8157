"""The semantic voice path on CPU: real-time factor of each part (GPT codes with the KV cache, the
teacher-forced latents pass, s2mel's 25-step flow matching, BigVGAN) at the tiny sizes the tests
use, and the FLOPs of s2mel and BigVGAN at the released sizes (counted by torch's FlopCounterMode on
one forward, random weights) with the GPT's from ``indextts.model.flops``.

Usage::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_voice.py [--seconds 4] [--repeats 3] [--threads 1]

Random weights: speed does not depend on them. The GPT never stops, so it makes exactly
``--seconds`` x 50 codes; the prompt is 3 s. RTF = wall seconds / audio seconds. Writes its
section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.benchmarks_md import cpu_name, write_section  # noqa: E402

BEGIN, END = "<!-- bench_voice.py: begin -->", "<!-- bench_voice.py: end -->"
CODE_RATE = 50.0  # semantic codes per second
PROMPT_SECONDS = 3.0
SAMPLING = dict(temperature=0.8, top_k=30, top_p=0.8, repetition_penalty=10.0)
# Dense bf16 tensor-core peak of an H100 SXM, and the share of it a well-fed inference kernel mix
# reaches (an assumption stated in the table, not a measurement).
H100_BF16 = 989e12
H100_SHARE = 0.3


def timed(fn, repeats: int) -> float:
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
    return statistics.median(walls)


def tiny_parts(seconds: float, repeats: int) -> dict:
    """Median wall seconds of each part for ``seconds`` of audio at the tiny sizes."""
    from indextts.audio.bigvgan import load_bigvgan, vocode
    from indextts.audio.s2mel import load_s2mel, target_mel_lengths
    from indextts.model import build_model, model_config
    from indextts.voice import make_tiny_voice

    T = int(seconds * CODE_RATE)
    cfg = model_config("tiny", n_codebooks=1, number_mel_codes=8194, max_mel_tokens=max(400, T + 4),
                       features={"kind": "w2v_bert", "w2v_bert_dim": 32})
    torch.manual_seed(0)
    gpt = build_model(cfg).eval()
    with torch.no_grad():
        gpt.mel_head.bias[cfg.stop_mel_token] = float("-inf")
    with tempfile.TemporaryDirectory() as tmp:
        files = make_tiny_voice(tmp, gpt_dim=cfg.model_dim, semantic_dim=32)
        s2mel, _ = load_s2mel(files["s2mel"])
        bigvgan, _, _ = load_bigvgan(files["bigvgan"])
    g = torch.Generator().manual_seed(0)
    text = torch.randint(2, cfg.text_vocab_size, (1, 30), generator=g)
    prompt = torch.randn(1, int(PROMPT_SECONDS * CODE_RATE), 32, generator=g)
    plen = torch.tensor([prompt.shape[1]])
    codes = {}

    def generate():
        codes["c"], _ = gpt.generate_codes(text, prompt, plen, max_new_tokens=T, generator=torch.Generator().manual_seed(1),
                                           **SAMPLING)

    out = {"gpt_params": sum(p.numel() for p in gpt.parameters()), "codes": T}
    out["gpt"] = timed(generate, repeats)
    c = codes["c"][:, 0]
    latents = {}
    out["latents"] = timed(lambda: latents.update(x=gpt.code_latents(text, c, prompt, plen)), repeats)
    n_ref = int(PROMPT_SECONDS * 22050 / 256)
    emb = torch.randn(1, T, 32, generator=g)
    ref_emb = torch.randn(1, int(PROMPT_SECONDS * CODE_RATE), 32, generator=g)
    mel_ref = torch.randn(1, 80, n_ref, generator=g)
    style = torch.randn(1, s2mel.cfg.style_dim, generator=g)
    mels = {}

    @torch.no_grad()
    def flow():
        s_infer = emb + s2mel.gpt_layer(latents["x"][None])
        cond = s2mel.regulate(s_infer, target_mel_lengths(torch.tensor([T])))
        cat = torch.cat([s2mel.regulate(ref_emb, torch.tensor([n_ref])), cond], dim=1)
        mels["m"] = s2mel.generate(cat, torch.tensor([cat.shape[1]]), mel_ref, style, n_steps=25,
                                   generator=torch.Generator().manual_seed(2))

    out["s2mel"] = timed(flow, repeats)
    out["bigvgan"] = timed(lambda: vocode(bigvgan, mels["m"]), repeats)
    out["audio_s"] = mels["m"].shape[-1] * 256 / 22050
    out["s2mel_params"] = sum(p.numel() for p in s2mel.parameters())
    out["bigvgan_params"] = sum(p.numel() for p in bigvgan.parameters())
    return out


def released_flops(seconds: float) -> dict:
    """FLOPs for ``seconds`` of audio after a 3 s prompt at the released sizes: s2mel (25 steps,
    classifier-free guidance doubles the batch) and BigVGAN, each counted on one forward."""
    from torch.utils.flop_counter import FlopCounterMode

    from indextts.audio.bigvgan import BigVGAN, BigVGANConfig
    from indextts.audio.s2mel import S2Mel, S2MelConfig
    from indextts.model import model_config
    from indextts.model.flops import flops_per_token

    T = int(seconds * CODE_RATE)
    n_gen = int(T * 1.72)
    n_ref = int(PROMPT_SECONDS * 22050 / 256)
    torch.manual_seed(0)
    s2mel = S2Mel(S2MelConfig()).eval()
    s2mel.setup_caches()
    est = s2mel.cfm.estimator
    L = n_ref + n_gen
    x = torch.randn(2, 80, L)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        est(x, torch.randn(2, 80, L), torch.tensor([L, L]), torch.rand(2), torch.randn(2, 192), torch.randn(2, L, 512))
    s2mel_flops = fc.get_total_flops() * 25
    del s2mel, est
    voc = BigVGAN(BigVGANConfig()).eval()
    voc.remove_weight_norm()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        voc(torch.randn(1, 80, 100))
    bigvgan_flops = fc.get_total_flops() * n_gen / 100
    cfg = model_config("indextts2")
    text = 60
    prefix = 34
    # generation: one token per step over a growing context, plus the latents pass over the whole sequence
    seq = prefix + text + 2 + T + 2
    gpt_flops = flops_per_token(cfg, seq) * (T + seq) / 3  # forward only: a third of training's 6N
    from indextts.model.flops import per_token_params

    return {"codes": T, "s2mel": s2mel_flops, "bigvgan": bigvgan_flops, "gpt": gpt_flops, "audio_s": n_gen * 256 / 22050,
            "gpt_params": per_token_params(cfg)}


def section(t: dict, f: dict, args) -> str:
    load = os.getloadavg()[0]
    rows = [("GPT codes, KV cache", t["gpt"]), ("GPT latents pass", t["latents"]), ("s2mel, 25 steps, CFG 0.7", t["s2mel"]),
            ("BigVGAN", t["bigvgan"])]
    total = sum(w for _, w in rows)
    lines = [
        BEGIN,
        "### Semantic voice path (`bench/bench_voice.py`)",
        "",
        f"Command: `OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_voice.py --seconds {args.seconds} "
        f"--repeats {args.repeats} --threads {args.threads}`  ",
        f"Machine: {cpu_name()}, `nproc` = {os.cpu_count()}, {torch.get_num_threads()} torch thread(s), torch "
        f"{torch.__version__}, fp32, CPU; load average {load:.1f} (a shared machine).",
        "",
        f"Tiny random models (GPT {t['gpt_params']:,}, s2mel {t['s2mel_params']:,}, BigVGAN {t['bigvgan_params']:,} "
        f"parameters), {t['codes']} codes = {t['audio_s']:.2f} s of audio after a {PROMPT_SECONDS:.0f} s prompt; "
        f"median of {args.repeats}. RTF = wall seconds / audio seconds.",
        "",
        "| part | wall s | RTF |",
        "|---|---:|---:|",
        *(f"| {name} | {w:.3f} | {w / t['audio_s']:.3f} |" for name, w in rows),
        f"| **all** | {total:.3f} | {total / t['audio_s']:.3f} |",
        "",
        f"At the released sizes (counted on one forward, random weights), {f['codes']} codes = {f['audio_s']:.2f} s "
        "of audio after a 3 s prompt:",
        "",
        "| part | GFLOP | per audio second | on one H100 at "
        f"{H100_SHARE:.0%} of its {H100_BF16 / 1e12:.0f} TFLOP/s bf16 |",
        "|---|---:|---:|---:|",
    ]
    for name, key in ((f"GPT (indextts2 preset, {f['gpt_params'] / 1e6:,.0f}M per-token parameters; generation + latents)", "gpt"), ("s2mel, 25 steps x 2 (CFG)", "s2mel"),
                      ("BigVGAN", "bigvgan")):
        flops = f[key]
        lines.append(f"| {name} | {flops / 1e9:,.0f} | {flops / f['audio_s'] / 1e9:,.0f} | "
                     f"{flops / (H100_BF16 * H100_SHARE) * 1e3:.1f} ms |")
    lines += [
        "",
        "The GPT's count is a third of its training FLOPs per token (6N + attention: the forward pass only) over the "
        "generated and the teacher-forced tokens. Autoregressive decoding at batch 1 is bound by memory bandwidth, not FLOPs: "
        f"reading its {f['gpt_params'] * 2 / 1e9:.1f} GB of bf16 weights per step at ~3.3 TB/s takes "
        f"{f['gpt_params'] * 2 / 3.3e12 * 1e3:.2f} ms a code at best, {f['gpt_params'] * 2 / 3.3e12 * 50:.3f} s per audio "
        "second (50 codes), beside which s2mel and BigVGAN cost little on a GPU; an estimate, not a measurement.",
        END,
    ]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=4.0, help="audio to generate (codes at 50/s)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true", help="print the section, leave BENCHMARKS.md alone")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t = tiny_parts(args.seconds, args.repeats)
    f = released_flops(args.seconds)
    text = section(t, f, args)
    print(text)
    if not args.no_write:
        write_section(text, BEGIN, END)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
