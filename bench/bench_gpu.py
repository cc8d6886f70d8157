"""The GPU benchmark, ready for the first GPU: training, extraction and synthesis at the released
sizes with random weights; writes its table to BENCHMARKS.md.

    .venv/bin/python bench/bench_gpu.py                 # CUDA, the indextts2 preset, ~5-8 minutes
    .venv/bin/python bench/bench_gpu.py --smoke         # CPU, tiny sizes, < 1 minute (tests/test_bench_gpu.py)

1. Stage-1 training at the ``indextts2`` preset (the released GPT: 1280 wide, 24 layers, 8194
   semantic codes, w2v-BERT prompt features): bf16 autocast, fused AdamW (weight decay on
   matrices, as the trainer), gradient clipping, at ``--batch-sizes`` utterances of 8-12 s
   (400-600 code frames, 60-100 text ids, 6 s prompts), padded to fixed shapes; eager, then with
   ``torch.compile(dynamic=True)`` as ``train.compile`` does. Reported: non-pad tokens/s (text +
   code targets, the trainer's count), MFU (``indextts.model.flops``: GPT positions/s x FLOPs per
   position against the device's dense bf16 peak, :data:`indextts.model.flops.PEAK_BF16`) and peak memory.
2. Extraction in x real time: DAC at the released 16 kHz size (12 codebooks of 1024, random
   weights) through the pipeline's exact batched encoder, fp32; w2v-BERT 2.0 to layer 17 + the
   MaskGCT semantic codec (random weights, fp32 and bf16 w2v-BERT), the device part (the fbank
   front end runs in DataLoader workers on CPUs; its single-core speed is reported beside).
3. Synthesis: ``generate_codes`` with the KV cache, bf16, sampling as the pipeline samples;
   RTF = wall seconds per second of codes (50 frames/s). The GPT only: the s2mel/vocoder stage
   that turns semantic codes into audio is not in it.

``--smoke`` runs the same code on the CPU with the tiny sizes (compile with the ``eager``
backend: dynamo traces, nothing is generated), so it works the first time a GPU appears. CPU
numbers are never written to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.benchmarks_md import write_section  # noqa: E402
from indextts.model import build_model, model_config  # noqa: E402
from indextts.model.flops import flops_per_token, peak_bf16  # noqa: E402

BEGIN, END = "<!-- bench_gpu.py: begin -->", "<!-- bench_gpu.py: end -->"
ANCHOR = "<!-- bench_data.py: end -->"
FRAME_RATE = 50.0


def _millions(n: int) -> str:
    return f"{n / 1e6:.0f}M" if n >= 10e6 else f"{n / 1e6:.2f}M"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


# --------------------------------------------------------------------------------------------
# 1. Training


def train_batch(cfg, B: int, shape: dict, g: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """Random utterances whose lengths vary per step, padded to the shape's fixed maxima (so a
    compiled model sees one shape per batch size)."""
    def lengths(lo_hi):
        return torch.randint(lo_hi[0], lo_hi[1] + 1, (B,), generator=g)

    tl, cl, fl = lengths(shape["text"]), lengths(shape["codes"]), lengths(shape["cond"])
    batch = dict(
        text_ids=torch.randint(3, cfg.text_vocab_size, (B, shape["text"][1]), generator=g),
        text_lengths=tl,
        codes=torch.randint(0, cfg.number_mel_codes - 2, (B, cfg.n_codebooks, shape["codes"][1]), generator=g),
        code_lengths=cl,
        cond_feats=torch.randn(B, shape["cond"][1], cfg.cond_feat_dim, generator=g),
        cond_lengths=fl,
    )
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def bench_training(cfg, device: torch.device, batch_sizes: list[int], shape: dict, steps: int, warmup: int,
                   compile_backend: str | None, peak: float | None) -> list[dict]:
    from indextts.train import param_groups

    torch.manual_seed(0)
    model = build_model(cfg).to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-4, fused=device.type == "cuda")
    params = [p for p in model.parameters() if p.requires_grad]
    bf16 = device.type == "cuda"

    def step(batch):
        with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    rows = []
    modes = [("eager", None)] + ([("compile", compile_backend)] if compile_backend else [])
    for mode, backend in modes:
        if backend is not None:
            model.compile(dynamic=True, backend=backend)
        for B in batch_sizes:
            g = torch.Generator().manual_seed(B)
            batches = [train_batch(cfg, B, shape, g, device) for _ in range(min(steps, 4))]
            reset_peak(device)
            t0 = time.perf_counter()
            for k in range(warmup):
                step(batches[k % len(batches)])
            sync(device)
            warm_s = time.perf_counter() - t0
            times, tokens, positions = [], 0, 0
            for k in range(steps):
                b = batches[k % len(batches)]
                sync(device)
                t0 = time.perf_counter()
                step(b)
                sync(device)
                times.append(time.perf_counter() - t0)
                tokens += int(b["text_lengths"].sum() + b["code_lengths"].sum()) + 2 * B
                positions += B * cfg.seq_len(b["text_ids"].shape[1], b["codes"].shape[-1])
            total = sum(times)
            seq = cfg.seq_len(shape["text"][1], shape["codes"][1])
            pos_s = positions / total
            rows.append({
                "mode": mode, "batch": B, "params": n_params, "positions": B * seq, "step_s": statistics.median(times), "warmup_s": warm_s,
                "tokens_s": tokens / total, "positions_s": pos_s,
                "mfu": pos_s * flops_per_token(cfg, seq) / peak if peak else None, "peak_gib": peak_gib(device),
            })
            print(f"  train {mode} B={B}: {rows[-1]}", file=sys.stderr, flush=True)
            del batches
    del model, opt
    return rows


# --------------------------------------------------------------------------------------------
# 2. Extraction


def _audio(B: int, seconds: tuple[float, float], sr: int, g: torch.Generator) -> tuple[torch.Tensor, list[int]]:
    lengths = [int(sr * (seconds[0] + (seconds[1] - seconds[0]) * float(torch.rand(1, generator=g)))) for _ in range(B)]
    audio = torch.zeros(B, max(lengths))
    for i, n in enumerate(lengths):
        audio[i, :n] = 0.1 * torch.randn(n, generator=g)
    return audio, lengths


def bench_dac(kwargs: dict, device: torch.device, B: int, seconds: tuple[float, float], repeats: int) -> dict:
    import warnings

    from indextts.audio.dac import _import_dac, encode_padded

    dac = _import_dac()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model = dac.DAC(**kwargs)
    for module in model.modules():
        if hasattr(module, "weight_g"):
            torch.nn.utils.remove_weight_norm(module)
    model = model.eval().requires_grad_(False).to(device)
    g = torch.Generator().manual_seed(0)
    audio, lengths = _audio(B, seconds, int(kwargs["sample_rate"]), g)
    audio = audio[:, None, :].to(device)
    encode_padded(model, audio, lengths)  # warm-up (cuDNN algorithm choice)
    reset_peak(device)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        encode_padded(model, audio, lengths)
    sync(device)
    wall = time.perf_counter() - t0
    audio_s = repeats * sum(lengths) / kwargs["sample_rate"]
    params = sum(p.numel() for p in model.parameters())
    del model
    return {"name": f"DAC {kwargs['sample_rate'] // 1000} kHz ({_millions(params)} params, {kwargs['n_codebooks']} "
                    f"codebooks of {kwargs['codebook_size']}), fp32", "batch": B, "xrt": audio_s / wall,
            "peak_gib": peak_gib(device)}


def bench_semantic(device: torch.device, smoke: bool, B: int, seconds: tuple[float, float], repeats: int) -> list[dict]:
    from transformers import SeamlessM4TFeatureExtractor, Wav2Vec2BertConfig, Wav2Vec2BertModel

    from indextts.audio.semantic_codec import (TINY_CODEC, TINY_W2V_BERT, TINY_W2V_BERT_LAYER, SemanticCodec,
                                               SemanticCodecConfig, SemanticEncoder)
    from indextts.audio.w2v_bert import W2VBert, W2VBertInputs

    w2v_cfg, layer, codec_cfg = ((TINY_W2V_BERT, TINY_W2V_BERT_LAYER, TINY_CODEC) if smoke
                                 else ({}, 17, SemanticCodecConfig()))
    torch.manual_seed(0)
    net = Wav2Vec2BertModel(Wav2Vec2BertConfig(**w2v_cfg)).eval().requires_grad_(False)
    net.encoder.layers = net.encoder.layers[:layer]
    dim = int(net.config.hidden_size)
    codec = SemanticCodec(codec_cfg).eval().requires_grad_(False).to(device)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        SeamlessM4TFeatureExtractor(padding_value=1.0).save_pretrained(d)
        inputs = W2VBertInputs(d)
        g = torch.Generator().manual_seed(1)
        audio, lengths = _audio(B, seconds, 16000, g)
        waves = [audio[i, :n].numpy() for i, n in enumerate(lengths)]
        t0 = time.perf_counter()
        batch = inputs(waves)
        fbank_xrt = sum(lengths) / 16000 / (time.perf_counter() - t0)
        for dtype in (["fp32"] if smoke else ["fp32", "bf16"]):
            torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
            w2v = W2VBert(net.to(device=device, dtype=torch_dtype), inputs, torch.zeros(dim), torch.ones(dim), layer,
                          device, torch_dtype)
            enc = SemanticEncoder(w2v, codec, None)
            enc.encode(batch)  # warm-up
            reset_peak(device)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(repeats):
                enc.encode(batch)
            sync(device)
            wall = time.perf_counter() - t0
            params = sum(p.numel() for p in net.parameters()) + sum(p.numel() for p in codec.parameters())
            rows.append({"name": f"w2v-BERT 2.0 to layer {layer} ({dtype}) + semantic codec ({_millions(params)} params), "
                                 f"device part", "batch": B, "xrt": repeats * sum(lengths) / 16000 / wall,
                         "peak_gib": peak_gib(device), "fbank_xrt": fbank_xrt})
    del net, codec
    return rows


# --------------------------------------------------------------------------------------------
# 3. Synthesis


def bench_synthesis(cfg, device: torch.device, batch_sizes: list[int], frames: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    model = build_model(cfg).to(device).eval()
    rows = []
    bf16 = device.type == "cuda"
    for B in batch_sizes:
        g = torch.Generator().manual_seed(B)
        text = torch.randint(3, cfg.text_vocab_size, (B, 80 if cfg.max_text_tokens >= 80 else 20), generator=g).to(device)
        cond = torch.randn(B, 300 if cfg.cond_feat_dim > 100 else 100, cfg.cond_feat_dim, generator=g).to(device)
        cond_len = torch.full((B,), cond.shape[1], device=device)
        gens = [torch.Generator(device=device).manual_seed(i) for i in range(B)]

        def run():
            with torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
                return model.generate_codes(text, cond, cond_len, max_new_tokens=frames, min_new_tokens=frames,
                                            temperature=0.8, top_k=30, top_p=0.8, repetition_penalty=10.0,
                                            generator=gens, use_cache=True)

        run()  # warm-up
        reset_peak(device)
        times = []
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            codes, lengths = run()
            sync(device)
            times.append(time.perf_counter() - t0)
        wall = statistics.median(times)
        n = int(lengths.max())
        rows.append({"batch": B, "frames": n, "wall_s": wall, "rtf": wall / (n / FRAME_RATE),
                     "frames_s": B * n / wall, "peak_gib": peak_gib(device)})
        print(f"  synthesis B={B}: {rows[-1]}", file=sys.stderr, flush=True)
    del model
    return rows


# --------------------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, < 1 minute; prints, never writes")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="training utterances per batch (default 8 16 32)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per configuration (default 10)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile runs")
    p.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    a = p.parse_args()
    smoke = a.smoke
    device = torch.device(a.device or ("cpu" if smoke else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device; run with --smoke for the CPU check", file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    t_start = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    peak = peak_bf16(name) if device.type == "cuda" else None
    if smoke:
        cfg = model_config("tiny", n_codebooks=1)
        shape = dict(text=(10, 20), codes=(40, 60), cond=(30, 50))
        batch_sizes, steps, warmup = a.batch_sizes or [2, 4], a.steps or 2, 1
        backend = None if a.no_compile else "eager"
        dac_batch, secs, repeats = 2, (1.0, 2.0), 1
        syn = dict(batch_sizes=[1, 2], frames=20, repeats=1)
    else:
        cfg = model_config("indextts2", n_codebooks=1)
        shape = dict(text=(60, 100), codes=(400, 600), cond=(300, 300))
        batch_sizes, steps, warmup = a.batch_sizes or [8, 16, 32], a.steps or 10, 3
        backend = None if a.no_compile else "inductor"
        dac_batch, secs, repeats = 16, (8.0, 12.0), 5
        syn = dict(batch_sizes=[1, 8], frames=500, repeats=3)
    from indextts.audio.dac import DAC_16KHZ_KWARGS, DEMO_CODEC_KWARGS

    dac_kwargs = DEMO_CODEC_KWARGS if smoke else DAC_16KHZ_KWARGS
    print(f"bench_gpu on {name} ({device}), peak bf16 {peak / 1e12 if peak else float('nan'):.0f} TFLOP/s",
          file=sys.stderr, flush=True)
    train = bench_training(cfg, device, batch_sizes, shape, steps, warmup, backend, peak)
    extraction = [bench_dac(dac_kwargs, device, dac_batch, secs, repeats)]
    extraction += bench_semantic(device, smoke, dac_batch, secs, repeats)
    synthesis = bench_synthesis(cfg, device, **syn)
    wall = time.perf_counter() - t_start
    text = render(a, cfg, name, peak, shape, train, extraction, synthesis, wall)
    print(text)
    if device.type == "cuda" and not a.no_write:
        write_section(text, BEGIN, END, anchor=ANCHOR)
    return 0


def _f(x: float | None, fmt: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def render(a, cfg, name: str, peak: float | None, shape: dict, train: list[dict], extraction: list[dict],
           synthesis: list[dict], wall: float) -> str:
    cmd = " ".join(["python", "bench/bench_gpu.py", *sys.argv[1:]])
    params = train[0]["params"] if train else None
    out = [BEGIN, "## GPU: training, extraction, synthesis at the released sizes (`bench/bench_gpu.py`)", "",
           f"Command: `.venv/bin/{cmd}` ({wall / 60:.1f} min)  ",
           f"Device: {name}; dense bf16 peak {_f(peak and peak / 1e12, '.0f')} TFLOP/s; torch {torch.__version__}, "
           f"CUDA {torch.version.cuda}, Python {platform.python_version()}", "",
           f"### Stage-1 training, `{cfg.preset}` preset{'' if params is None else f' ({params:,} params)'}, random weights",
           "",
           ("bf16 autocast, fused AdamW" if peak is not None or name.startswith("NVIDIA") else "fp32 (CPU), AdamW")
           + f", clipping; utterances of {shape['codes'][0]}-{shape['codes'][1]} code frames, "
           f"{shape['text'][0]}-{shape['text'][1]} text ids, {shape['cond'][1]}-frame prompts, padded to the longest; "
           "tokens/s counts non-pad text + code targets (the trainer's count), MFU all GPT positions computed "
           "(`indextts.model.flops`, 6N + 12Ld T per position) against the peak.", "",
           "| mode | utterances / batch | GPT positions / batch | step (s) | tokens/s | MFU | peak memory (GiB) | warm-up (s) |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in train:
        out.append(f"| {r['mode']} | {r['batch']} | {r['positions']:,} | {r['step_s']:.3f} | {r['tokens_s']:,.0f} | "
                   f"{_f(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} | {_f(r['peak_gib'], '.1f')} | "
                   f"{r['warmup_s']:.1f} |")
    out += ["", "### Extraction (x real time, random weights)", "",
            "| model | utterances / batch | x real time | peak memory (GiB) |", "|---|---:|---:|---:|"]
    for r in extraction:
        out.append(f"| {r['name']} | {r['batch']} | {r['xrt']:,.0f} | {_f(r['peak_gib'], '.1f')} |")
    fb = [r["fbank_xrt"] for r in extraction if "fbank_xrt" in r]
    if fb:
        out += ["", f"The w2v-BERT fbank front end (CPU, one core, in the DataLoader workers): {fb[0]:,.0f} x real time."]
    out += ["", f"### Synthesis (`generate_codes`, KV cache{', bf16' if peak is not None or name.startswith('NVIDIA') else ''}, "
            "top-k 30, top-p 0.8, repetition penalty 10)", "",
            "RTF = wall seconds per second of codes (50 frames/s): the GPT only, without the s2mel/vocoder stage.", "",
            "| utterances / batch | frames | wall (s) | RTF | frames/s | peak memory (GiB) |", "|---:|---:|---:|---:|---:|---:|"]
    for r in synthesis:
        out.append(f"| {r['batch']} | {r['frames']} | {r['wall_s']:.2f} | {r['rtf']:.3f} | {r['frames_s']:,.0f} | "
                   f"{_f(r['peak_gib'], '.1f')} |")
    out.append(END)
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
