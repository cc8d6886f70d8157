"""indextts.audio.s2mel: the released key list, strict loading, and each step of IndexTTS2's s2mel
(length regulator, target lengths, DiT velocity, Euler + CFG, prompt prefix, mel) against
computations written here from the reference facts, on small random weights. Parity with the
official code itself is measured outside the tests (it needs the upstream source)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from indextts.audio.s2mel import (
    SUBMODELS,
    S2Mel,
    S2MelConfig,
    S2MelLoadError,
    load_s2mel,
    make_random_s2mel,
    mel_spectrogram,
    save_s2mel,
    target_mel_lengths,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DATA = Path(__file__).resolve().parent / "data"
TINY = S2MelConfig.tiny()


def _tsv(name: str) -> list[list[str]]:
    lines = (DATA / name).read_text().splitlines()
    assert lines[0].startswith("submodel\tkey\t")
    return [ln.split("\t") for ln in lines[1:] if ln]


def _perturbed(seed: int = 0, cfg: S2MelConfig = TINY) -> S2Mel:
    """A tiny model whose every tensor is off its initial value (norm weights, g = |v|, zeros)."""
    torch.manual_seed(seed)
    model = S2Mel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    return make_random_s2mel(tmp_path_factory.mktemp("s2mel") / "s2mel.pth", TINY, seed=3)


# --------------------------------------------------------------------------------------------
# Names, shapes, loading


def test_released_size_model_has_the_released_key_list_in_order():
    ref = [(s, k, tuple(int(x) for x in shape.split(",") if x), dtype) for s, k, shape, dtype in _tsv("indextts2_s2mel_state_dict.tsv")]
    kinds = {(s, k): kind for s, k, kind in _tsv("indextts2_s2mel_state_dict_kinds.tsv")}
    with torch.device("meta"):
        model = S2Mel(S2MelConfig())
    ours = [(s, k, tuple(v.shape), str(v.dtype).removeprefix("torch."))
            for s in SUBMODELS for k, v in getattr(model, s).state_dict().items()]
    missing, extra = sorted(set(ref) - set(ours)), sorted(set(ours) - set(ref))
    assert not missing and not extra, f"in the released file, not in ours: {missing}\nin ours, not in the file: {extra}"
    assert ours == ref  # and in the file's order
    params = {(s, k) for s in SUBMODELS for k, _ in getattr(model, s).named_parameters()}
    assert {x for x, kind in kinds.items() if kind == "param"} == params
    assert sum(p.numel() for p in model.parameters()) == 103_668_688  # reference facts section 3.6


def test_tiny_config_keeps_the_released_code_paths():
    with torch.device("meta"):
        model = S2Mel(TINY)
    n = sum(p.numel() for p in model.parameters())
    assert n < 50_000
    assert TINY.depth % 2 == 1 and TINY.depth >= 5  # a middle block, and two skips (their order matters)
    assert TINY.wavenet_layers >= 2 and TINY.n_mels == 80 and TINY.sample_rate == 22050


def test_random_file_round_trips_and_loads_with_no_notes(tiny_file, tmp_path):
    again = make_random_s2mel(tmp_path / "again.pth", TINY, seed=3)
    state, state2 = torch.load(tiny_file, weights_only=True), torch.load(again, weights_only=True)
    assert set(state) == {"net", "config"} and set(state["net"]) == set(SUBMODELS)
    assert tiny_file.read_bytes() == make_random_s2mel(tmp_path / "same.pth", TINY, seed=3).read_bytes()
    assert all(torch.equal(state["net"][s][k], state2["net"][s][k]) for s in SUBMODELS for k in state["net"][s])
    model, notes = load_s2mel(tiny_file, TINY)
    assert notes == [] and not model.training
    torch.manual_seed(3)
    fresh = S2Mel(TINY).eval()  # what make_random_s2mel built before saving
    args = _inputs(TINY, [30], [12], seed=1)
    noise = torch.randn(1, 80, 30, generator=torch.Generator().manual_seed(2))
    assert torch.equal(model.generate(*args, noise=noise), fresh.generate(*args, noise=noise))
    # and save_s2mel of a loaded model writes the same tensors back
    back = torch.load(save_s2mel(model, tmp_path / "back.pth"), weights_only=True)
    assert all(torch.equal(back["net"][s][k], state["net"][s][k]) for s in SUBMODELS for k in state["net"][s])


def _rewrite(src: Path, dst: Path, edit) -> Path:
    state = torch.load(src, weights_only=True)
    edit(state)
    torch.save(state, dst)
    return dst


def test_missing_or_reshaped_tensor_is_an_error_naming_the_submodel_and_key(tiny_file, tmp_path):
    key = "estimator.transformer.layers.2.skip_in_linear.weight"
    bad = _rewrite(tiny_file, tmp_path / "missing.pth", lambda s: s["net"]["cfm"].pop(key))
    with pytest.raises(S2MelLoadError, match=r"(?s)missing\.pth.*net\['cfm'\] misses 1 tensors: " + key.replace(".", r"\.")):
        load_s2mel(bad, TINY)

    def reshape(s):
        s["net"]["length_regulator"]["content_in_proj.weight"] = torch.zeros(3, 4)

    bad = _rewrite(tiny_file, tmp_path / "shape.pth", reshape)
    with pytest.raises(S2MelLoadError, match=r"net\['length_regulator'\] has 1 tensors of another shape: content_in_proj\.weight: file \(3, 4\)"):
        load_s2mel(bad, TINY)
    bad = _rewrite(tiny_file, tmp_path / "nogpt.pth", lambda s: s["net"].pop("gpt_layer"))
    with pytest.raises(S2MelLoadError, match=r"net\['gpt_layer'\] is missing"):
        load_s2mel(bad, TINY)
    # The file records its sizes; without them (the released file) the released sizes are expected.
    assert load_s2mel(tiny_file)[0].cfg == TINY
    bare = _rewrite(tiny_file, tmp_path / "bare.pth", lambda s: s.pop("config"))
    with pytest.raises(S2MelLoadError, match="other sizes"):
        load_s2mel(bare)
    odd = _rewrite(tiny_file, tmp_path / "odd.pth", lambda s: s["config"].update(colour=1))
    with pytest.raises(S2MelLoadError, match=r"'config' entry is not an s2mel config \(unknown \['colour'\]\)"):
        load_s2mel(odd)
    with pytest.raises(S2MelLoadError, match="not found"):
        load_s2mel(tmp_path / "absent.pth", TINY)
    torch.save({"model": {}}, tmp_path / "flat.pth")
    with pytest.raises(S2MelLoadError, match="'net'"):
        load_s2mel(tmp_path / "flat.pth", TINY)


def test_training_entries_and_ddp_prefixes_load_with_notes(tiny_file, tmp_path):
    def edit(s):
        s["optimizer"] = {"state": {}, "param_groups": []}
        s["epoch"], s["iters"] = 2, 100
        s["net"]["cfm"] = {"module." + k: v for k, v in s["net"]["cfm"].items()}
        s["net"]["length_regulator"]["model.1.num_batches_tracked"] = torch.tensor(0)
        s["net"]["emo_layer"] = {"weight": torch.zeros(2)}

    path = _rewrite(tiny_file, tmp_path / "train.pth", edit)
    model, notes = load_s2mel(path, TINY)
    text = "\n".join(notes)
    for word in ("'optimizer'", "'epoch'", "'iters'", "net['emo_layer']", "num_batches_tracked"):
        assert word in text, text
    assert f"stripped the DDP prefix 'module.' from {len(model.cfm.state_dict())} keys" in text
    plain, _ = load_s2mel(tiny_file, TINY)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))


# --------------------------------------------------------------------------------------------
# Length regulator and target lengths


def _regulate_by_hand(lr_sd: dict, cfg: S2MelConfig, x: torch.Tensor, T_out: int) -> torch.Tensor:
    h = x @ lr_sd["content_in_proj.weight"].T + lr_sd["content_in_proj.bias"]  # (T_in, C)
    T_in = h.shape[0]
    # torch's legacy nearest: floor(i * float32(T_in / T_out)), clamped (reference trap 14)
    scale = torch.tensor(T_in / T_out, dtype=torch.float32)
    idx = torch.clamp(torch.floor(torch.arange(T_out, dtype=torch.float32) * scale).long(), max=T_in - 1)
    h = h[idx].T[None]  # (1, C, T_out)
    for i in range(cfg.regulator_blocks):
        h = F.conv1d(h, lr_sd[f"model.{3 * i}.weight"], lr_sd[f"model.{3 * i}.bias"], padding=1)
        mean, var = h.mean(dim=(1, 2), keepdim=True), h.var(dim=(1, 2), unbiased=False, keepdim=True)
        h = (h - mean) / torch.sqrt(var + 1e-5) * lr_sd[f"model.{3 * i + 1}.weight"][:, None] + lr_sd[f"model.{3 * i + 1}.bias"][:, None]
        h = h * torch.tanh(F.softplus(h))  # Mish
    last = 3 * cfg.regulator_blocks
    return F.conv1d(h, lr_sd[f"model.{last}.weight"], lr_sd[f"model.{last}.bias"])[0].T  # (T_out, C)


def test_length_regulator_stretches_to_each_target_length_by_legacy_nearest():
    model = _perturbed(1)
    sd = model.length_regulator.state_dict()
    x = torch.randn(3, 26, TINY.semantic_dim)
    lengths, in_lengths = torch.tensor([44, 30, 7]), torch.tensor([26, 17, 9])
    out = model.regulate(x, lengths, in_lengths)
    assert out.shape == (3, 44, TINY.regulator_channels)
    for b in range(3):
        n, m = int(in_lengths[b]), int(lengths[b])
        want = _regulate_by_hand(sd, TINY, x[b, :n], m)
        torch.testing.assert_close(out[b, :m], want, atol=1e-5, rtol=1e-5)
        assert not out[b, m:].any()
        torch.testing.assert_close(out[b : b + 1, :m], model.regulate(x[b : b + 1, :n], lengths[b : b + 1]), atol=0, rtol=0)
    # 26 -> 44 (row 0) is a case where the float32 scale picks another frame than the exact
    # floor(i * 26 / 44) would: the regulator follows the float32 rule, as upstream's F.interpolate does.
    exact = torch.arange(44) * 26 // 44
    legacy = torch.floor(torch.arange(44, dtype=torch.float32) * torch.tensor(26 / 44, dtype=torch.float32)).long()
    assert not torch.equal(exact, legacy)


def test_target_mel_lengths_floor_172_n_over_100():
    n = torch.arange(0, 5000)
    assert torch.equal(target_mel_lengths(n), n * 172 // 100)
    assert target_mel_lengths(torch.tensor([60])).item() == 103  # never rounded (103.2)
    assert target_mel_lengths(torch.tensor([100])).item() == 172


# --------------------------------------------------------------------------------------------
# DiT velocity against a functional version written from the reference facts


def _wn(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return v * (g / v.flatten(1).norm(dim=1).reshape(g.shape))


def _velocity_by_hand(sd: dict, cfg: S2MelConfig, x, prompt_x, t, style, mu) -> torch.Tensor:
    """One row at a time, full length. x, prompt_x (80, T); t float; style (S,); mu (T, C)."""
    p = "estimator."
    lin = lambda h, n: h @ sd[p + n + ".weight"].T + sd[p + n + ".bias"]  # noqa: E731
    T, D, H = x.shape[1], cfg.hidden_dim, cfg.num_heads
    hd = D // H

    def temb(n):
        half = cfg.time_embed_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half) / half)
        a = 1000 * t * freqs
        e = torch.cat([torch.cos(a), torch.sin(a)])
        return lin(F.silu(lin(e, n + ".mlp.0")), n + ".mlp.2")

    t1, t2 = temb("t_embedder"), temb("t_embedder2")

    def ada(h, n):
        w, b = lin(t1, n + ".project_layer").chunk(2)
        return w * (h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * sd[p + n + ".norm.weight"]) + b

    h = torch.cat([x.T, prompt_x.T, lin(mu, "cond_projection"), style.expand(T, -1)], dim=1)
    h = lin(h, "cond_x_merge_linear")
    pos = torch.arange(T)[:, None] * (10000.0 ** (-torch.arange(0, hd, 2) / hd))[None]  # (T, hd/2)
    rot = torch.polar(torch.ones_like(pos), pos)

    def rope(q):  # (T, H, hd): pairs (2i, 2i+1) as complex numbers
        return torch.view_as_real(torch.view_as_complex(q.reshape(T, H, hd // 2, 2).contiguous()) * rot[:, None]).reshape(T, H, hd)

    stack, mid = [], cfg.depth // 2
    for i in range(cfg.depth):
        L = f"transformer.layers.{i}."
        if i > mid:
            h = lin(torch.cat([h, stack.pop()], dim=1), L + "skip_in_linear")
        a = ada(h, L + "attention_norm")
        q, k, v = (a @ sd[p + L + "attention.wqkv.weight"].T).split(D, dim=1)
        q, k, v = rope(q.reshape(T, H, hd)), rope(k.reshape(T, H, hd)), v.reshape(T, H, hd)
        att = torch.softmax(torch.einsum("thd,shd->hts", q, k) / math.sqrt(hd), dim=-1)
        h = h + torch.einsum("hts,shd->thd", att, v).reshape(T, D) @ sd[p + L + "attention.wo.weight"].T
        f = ada(h, L + "ffn_norm")
        f = (F.silu(f @ sd[p + L + "feed_forward.w1.weight"].T) * (f @ sd[p + L + "feed_forward.w3.weight"].T))
        h = h + f @ sd[p + L + "feed_forward.w2.weight"].T
        if i < mid:
            stack.append(h)
    h = ada(h, "transformer.norm")
    h = lin(torch.cat([h, x.T], dim=1), "skip_linear")
    W, K = cfg.wavenet_hidden, cfg.wavenet_kernel
    w = lin(h, "conv1").T[None]  # (1, W, T)

    def wconv(z, n, pad):
        n = p + "wavenet." + n + ".conv.conv."
        z = F.pad(z, (pad, pad), mode="reflect") if pad else z  # reflect, not zeros (trap 9)
        return F.conv1d(z, _wn(sd[n + "weight_v"], sd[n + "weight_g"]), sd[n + "bias"])

    g = wconv(t2[None, :, None], "cond_layer", 0)
    out = torch.zeros_like(w)
    for i in range(cfg.wavenet_layers):
        a = wconv(w, f"in_layers.{i}", (K - 1) // 2) + g[:, 2 * W * i : 2 * W * (i + 1)]
        rs = wconv(torch.tanh(a[:, :W]) * torch.sigmoid(a[:, W:]), f"res_skip_layers.{i}", 0)
        if i < cfg.wavenet_layers - 1:
            w, out = w + rs[:, :W], out + rs[:, W:]
        else:
            out = out + rs
    y = out[0].T + lin(h, "res_projection")
    shift, scale = lin(F.silu(t1), "final_layer.adaLN_modulation.1").chunk(2)
    y = F.layer_norm(y, (W,), eps=1e-6) * (1 + scale) + shift
    y = y @ _wn(sd[p + "final_layer.linear.weight_v"], sd[p + "final_layer.linear.weight_g"]).T + sd[p + "final_layer.linear.bias"]
    return F.conv1d(y.T[None], sd[p + "conv2.weight"], sd[p + "conv2.bias"])[0]  # (80, T)


def _inputs(cfg: S2MelConfig, totals: list[int], prompts: list[int], seed: int):
    g = torch.Generator().manual_seed(seed)
    B, T, P = len(totals), max(totals), max(prompts)
    cond = torch.randn(B, T, cfg.regulator_channels, generator=g)
    for b, n in enumerate(totals):
        cond[b, n:] = 0
    return cond, torch.tensor(totals), torch.randn(B, cfg.n_mels, P, generator=g) - 4, torch.randn(B, cfg.style_dim, generator=g)


def test_dit_velocity_matches_a_by_hand_forward():
    model = _perturbed(2)
    sd = model.cfm.state_dict()
    est = model.cfm.estimator
    g = torch.Generator().manual_seed(5)
    T = 23
    x, px = torch.randn(2, 80, T, generator=g), torch.randn(2, 80, T, generator=g)
    style, mu = torch.randn(2, TINY.style_dim, generator=g), torch.randn(2, T, TINY.regulator_channels, generator=g)
    t = torch.tensor([0.0, 0.64])
    with torch.no_grad():
        v = est(x, px, torch.tensor([T, T]), t, style, mu)
        for b in range(2):
            want = _velocity_by_hand(sd, TINY, x[b], px[b], t[b], style[b], mu[b])
            torch.testing.assert_close(v[b], want, atol=2e-5, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Euler + CFG, the prompt prefix


def test_one_and_two_euler_steps_with_the_cfg_mix_by_hand():
    model = _perturbed(3)
    est = model.cfm.estimator
    cond, L, prompt, style = _inputs(TINY, [20], [8], seed=4)
    z = torch.randn(1, 80, 20, generator=torch.Generator().manual_seed(9))
    T, P = 20, 8
    px = torch.zeros(1, 80, T)
    px[..., :P] = prompt
    zero = torch.zeros

    def euler(schedule):
        x = z.clone()
        x[..., :P] = 0  # the noise under the prompt is discarded
        with torch.no_grad():
            for t, dt in schedule:
                tt = torch.tensor([t])
                v_c = est(x, px, L, tt, style, cond)
                v_u = est(x, zero(1, 80, T), L, tt, zero(1, TINY.style_dim), zero(1, T, TINY.regulator_channels))
                x = x + dt * (1.7 * v_c - 0.7 * v_u)
                x[..., :P] = 0
        return x[..., P:]

    torch.testing.assert_close(model.generate(cond, L, prompt, style, n_steps=1, noise=z), euler([(0.0, 1.0)]), atol=1e-5, rtol=1e-5)
    two = euler([(0.0, 0.5), (0.5, 0.5)])
    torch.testing.assert_close(model.generate(cond, L, prompt, style, n_steps=2, noise=z), two, atol=1e-5, rtol=1e-5)
    # cfg_rate 0: the conditional velocity alone
    with torch.no_grad():
        x0 = z.clone()
        x0[..., :P] = 0
        plain = (x0 + est(x0, px, L, torch.tensor([0.0]), style, cond))[..., P:]
    torch.testing.assert_close(model.generate(cond, L, prompt, style, n_steps=1, cfg_rate=0.0, noise=z), plain, atol=1e-5, rtol=1e-5)
    # temperature scales the injected noise like a drawn one
    half = model.generate(cond, L, prompt, style, n_steps=1, noise=z, temperature=0.5)
    torch.testing.assert_close(half, model.generate(cond, L, prompt, style, n_steps=1, noise=0.5 * z), atol=0, rtol=0)


def test_prompt_region_stays_zero_and_output_is_what_follows_the_prompt():
    model = _perturbed(4)
    cond, L, prompt, style = _inputs(TINY, [25], [10], seed=6)
    z = torch.randn(1, 80, 25, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        px = torch.zeros(1, 80, 25)
        px[..., :10] = prompt
        x = model.cfm.solve(z, L, torch.tensor([10]), px, cond, style, 5, 0.7)
    assert not x[..., :10].any()  # re-zeroed after every step, returned zero there
    assert x[..., 10:].abs().min() > 0
    out = model.generate(cond, L, prompt, style, n_steps=5, noise=z)
    assert out.shape == (1, 80, 15)
    torch.testing.assert_close(out, x[..., 10:], atol=0, rtol=0)
    # the noise under the prompt does not matter; the prompt mel does
    z2 = z.clone()
    z2[..., :10] = 100.0
    torch.testing.assert_close(model.generate(cond, L, prompt, style, n_steps=5, noise=z2), out, atol=0, rtol=0)
    assert not torch.equal(model.generate(cond, L, prompt + 1, style, n_steps=5, noise=z), out)


# --------------------------------------------------------------------------------------------
# Seeds and batches


def test_same_seed_same_output_and_generator_draws_like_upstream():
    model = _perturbed(5)
    cond, L, prompt, style = _inputs(TINY, [18], [6], seed=2)
    a = model.generate(cond, L, prompt, style, n_steps=3, generator=torch.Generator().manual_seed(11))
    b = model.generate(cond, L, prompt, style, n_steps=3, generator=torch.Generator().manual_seed(11))
    c = model.generate(cond, L, prompt, style, n_steps=3, generator=torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # upstream draws randn([B, 80, T]) from the global generator: the same numbers for one row
    z = torch.randn(1, 80, 18, generator=torch.Generator().manual_seed(11))
    assert torch.equal(model.generate(cond, L, prompt, style, n_steps=3, noise=z), a)


def test_batch_rows_with_different_lengths_equal_each_row_alone():
    model = _perturbed(6)
    totals, prompts = [31, 19, 24], [9, 12, 4]
    cond, L, prompt, style = _inputs(TINY, totals, prompts, seed=3)
    P = torch.tensor(prompts)
    noise = torch.randn(3, 80, 31, generator=torch.Generator().manual_seed(4))
    out = model.generate(cond, L, prompt, style, n_steps=4, noise=noise, prompt_lengths=P)
    gen = torch.Generator().manual_seed(8)
    drawn = model.generate(cond, L, prompt, style, n_steps=4, generator=gen, prompt_lengths=P)
    seq = torch.Generator().manual_seed(8)
    assert out.shape == (3, 80, 22)
    for b, (n, p) in enumerate(zip(totals, prompts)):
        row = (cond[b : b + 1, :n], L[b : b + 1], prompt[b : b + 1, :, :p], style[b : b + 1])
        alone = model.generate(*row, n_steps=4, noise=noise[b : b + 1, :, :n])
        torch.testing.assert_close(out[b : b + 1, :, : n - p], alone, atol=1e-5, rtol=1e-5)
        assert not out[b, :, n - p :].any()
        # drawn noise: the batch gets what the rows called one after another with one generator get
        torch.testing.assert_close(drawn[b : b + 1, :, : n - p], model.generate(*row, n_steps=4, generator=seq), atol=1e-5, rtol=1e-5)


def test_generate_runs_in_fp32_under_autocast_and_rejects_bad_shapes():
    model = _perturbed(7)
    cond, L, prompt, style = _inputs(TINY, [16], [5], seed=1)
    z = torch.randn(1, 80, 16)
    plain = model.generate(cond, L, prompt, style, n_steps=2, noise=z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = model.generate(cond, L, prompt, style, n_steps=2, noise=z)
    assert auto.dtype == torch.float32 and torch.equal(auto, plain)
    with pytest.raises(ValueError, match="style"):
        model.generate(cond, L, prompt, style[:, :3])
    with pytest.raises(ValueError, match="frames after its prompt"):
        model.generate(cond, torch.tensor([5]), prompt, style)
    with pytest.raises(ValueError, match="noise"):
        model.generate(cond, L, prompt, style, noise=z[..., :10])


# --------------------------------------------------------------------------------------------
# Mel


def _slaney_mel_filters(sr: int, n_fft: int, n_mels: int, fmin: float, fmax: float) -> np.ndarray:
    """Slaney-scale triangles with area normalisation (what librosa.filters.mel gives by default)."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0

    def hz_to_mel(f):
        f = np.asarray(f, dtype=np.float64)
        return np.where(f >= min_log_hz, min_log_mel + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, f / f_sp)

    def mel_to_hz(m):
        return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)

    edges = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    fft_f = np.linspace(0, sr / 2, n_fft // 2 + 1)
    lower = (fft_f[None, :] - edges[:-2, None]) / (edges[1:-1] - edges[:-2])[:, None]
    upper = (edges[2:, None] - fft_f[None, :]) / (edges[2:] - edges[1:-1])[:, None]
    return np.maximum(0, np.minimum(lower, upper)) * (2.0 / (edges[2:] - edges[:-2]))[:, None]


def test_mel_spectrogram_matches_an_independent_stft_and_slaney_filters():
    cfg = S2MelConfig()
    rng = np.random.default_rng(0)
    for N in (385, 5000, 22050):
        audio = (rng.uniform(-0.5, 0.5, size=(2, N)) * np.sin(np.arange(N) / 7.0)).astype(np.float32)
        mel = mel_spectrogram(torch.from_numpy(audio), cfg)
        assert mel.shape == (2, 80, N // 256) and mel.dtype == torch.float32
        y = np.pad(audio.astype(np.float64), ((0, 0), (384, 384)), mode="reflect")
        n = np.arange(1024)
        window = 0.5 - 0.5 * np.cos(2 * np.pi * n / 1024)  # periodic Hann
        frames = np.stack([y[:, i * 256 : i * 256 + 1024] for i in range(N // 256)], axis=1)  # (2, F, 1024)
        X = np.fft.rfft(frames * window, axis=-1)
        mag = np.sqrt(np.abs(X) ** 2 + 1e-9)
        basis = _slaney_mel_filters(22050, 1024, 80, 0.0, 11025.0)  # fmax "None" -> sr / 2
        want = np.log(np.maximum(np.einsum("mk,bfk->bmf", basis, mag), 1e-5))
        np.testing.assert_allclose(mel.numpy(), want, atol=2e-4, rtol=0)
    with pytest.raises(ValueError, match="too few"):
        mel_spectrogram(torch.zeros(1, 384), cfg)
