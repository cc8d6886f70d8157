"""indextts.audio.bigvgan: the released BigVGAN v2 key list (with and without weight norm), strict
loading of the released folder layout, the anti-aliasing filter, and exact, batch-independent vocoding."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from indextts.audio.bigvgan import (
    RELEASED_BIGVGAN_CONFIG,
    BigVGAN,
    BigVGANConfig,
    BigVGANLoadError,
    kaiser_sinc_filter,
    load_bigvgan,
    make_random_bigvgan,
    tiny_bigvgan_config,
    vocode,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The generator state dict of nvidia/bigvgan_v2_22khz_80band_256x (copies of shared/reference/).
DATA = Path(__file__).resolve().parent / "data"


def read_tsv(name: str) -> list[list[str]]:
    lines = (DATA / name).read_text().splitlines()
    return [line.split("\t") for line in lines[1:] if line]


def rows(model: torch.nn.Module) -> list[list[str]]:
    return [[k, ",".join(map(str, v.shape)), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]


def fused_rows(ref: list[list[str]]) -> list[list[str]]:
    """The key list after remove_weight_norm: each weight_g/weight_v pair becomes one ``weight`` of
    v's shape, where ``weight_g`` was."""
    out = []
    for key, shape, dtype in ref:
        if key.endswith(".weight_g"):
            continue
        out.append([key.removesuffix("_v"), shape, dtype] if key.endswith(".weight_v") else [key, shape, dtype])
    return out


def mel(frames: int, rows: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 80, frames, generator=g) * 1.5 - 5.0  # log-mel-like levels


def test_released_size_generator_matches_the_reference_key_list_before_and_after_removing_weight_norm():
    ref = read_tsv("bigvgan_22khz_80band_state_dict.tsv")
    assert len(ref) == 783
    with torch.device("meta"):
        model = BigVGAN(BigVGANConfig.from_dict(RELEASED_BIGVGAN_CONFIG))
    assert model.cfg == BigVGANConfig()
    assert rows(model) == ref  # as stored: names, shapes (ConvTranspose g per input channel), order
    params = {name for name, _ in model.named_parameters()}
    kinds = read_tsv("bigvgan_22khz_80band_state_dict_kinds.tsv")
    assert {k for k, kind in kinds if kind == "param"} == params
    assert sum(kind == "buffer" for _, kind in kinds) == 218  # the anti-aliasing filters
    assert sum(p.numel() for p in model.parameters()) == 112_231_249
    model.remove_weight_norm()
    assert rows(model) == fused_rows(ref) and len(fused_rows(ref)) == 667


def test_tiny_config_has_the_released_keys_and_audio_settings():
    tiny = tiny_bigvgan_config()
    assert tiny.keys() == RELEASED_BIGVGAN_CONFIG.keys()
    assert (tiny["sampling_rate"], tiny["num_mels"], tiny["hop_size"]) == (22050, 80, 256)
    assert math.prod(tiny["upsample_rates"]) == 256
    assert tiny_bigvgan_config() is not tiny_bigvgan_config()  # a fresh dict each call
    bad = {**tiny, "upsample_rates": [8, 8, 2]}
    with pytest.raises(BigVGANLoadError, match=r"multiply to 128, not hop_size 256"):
        BigVGANConfig.from_dict(bad, "cfg.json")
    with pytest.raises(BigVGANLoadError, match="cfg.json: BigVGAN config lacks num_mels"):
        BigVGANConfig.from_dict({k: v for k, v in tiny.items() if k != "num_mels"}, "cfg.json")
    with pytest.raises(BigVGANLoadError, match="resblock '2' is not supported"):
        BigVGANConfig.from_dict({**tiny, "resblock": "2"})


def test_antialiasing_filter_is_the_kaiser_windowed_sinc():
    taps = kaiser_sinc_filter(0.25, 0.3, 12).flatten().double().numpy()
    # Kaiser's design: attenuation from the transition width, beta from the attenuation.
    atten = 2.285 * (6 - 1) * math.pi * (4 * 0.3) + 7.95
    beta = 0.1102 * (atten - 8.7)
    t = np.arange(-6, 6) + 0.5
    want = 2 * 0.25 * np.kaiser(12, beta) * np.sinc(2 * 0.25 * t)
    np.testing.assert_allclose(taps, want / want.sum(), rtol=0, atol=1e-7)


def test_random_folder_round_trips_strictly_and_matches_the_weight_normed_model(tmp_path):
    config = tiny_bigvgan_config()
    folder = make_random_bigvgan(tmp_path / "voc", config, seed=3)
    again = make_random_bigvgan(tmp_path / "again", config, seed=3)
    assert (folder / "bigvgan_generator.pt").read_bytes() == (again / "bigvgan_generator.pt").read_bytes()
    assert json.loads((folder / "config.json").read_text()) == config
    ckpt = torch.load(folder / "bigvgan_generator.pt", weights_only=True)
    assert list(ckpt) == ["generator"] and "conv_pre.weight_v" in ckpt["generator"]  # the released layout

    model, got_config, report = load_bigvgan(folder)
    assert got_config == config and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert "conv_pre.weight" in model.state_dict() and "conv_pre.weight_g" not in model.state_dict()  # weight norm removed
    assert len(report) == 1 and "non-released generator settings" in report[0]

    # The generator as stored, weight norm in place: removing it changes no bit of the output.
    direct = BigVGAN(BigVGANConfig.from_dict(config))
    direct.load_state_dict(ckpt["generator"])
    x = mel(40)
    with torch.no_grad():
        want = direct.eval()(x).squeeze(1)
    assert torch.equal(vocode(model, x), want)


def _rewrite(folder: Path, dst: Path, edit) -> Path:
    """A copy of a BigVGAN folder whose generator state dict went through ``edit``."""
    dst.mkdir()
    (dst / "config.json").write_text((folder / "config.json").read_text())
    ckpt = torch.load(folder / "bigvgan_generator.pt", weights_only=True)
    torch.save({"generator": edit(ckpt["generator"])}, dst / "bigvgan_generator.pt")
    return dst


def test_strict_load_names_missing_and_reshaped_keys_and_reports_unused(tmp_path):
    good = make_random_bigvgan(tmp_path / "good", tiny_bigvgan_config(), seed=1)
    key = "resblocks.4.activations.3.upsample.filter"  # buffers must be in the file too
    missing = _rewrite(good, tmp_path / "missing", lambda s: {k: v for k, v in s.items() if k != key})
    with pytest.raises(BigVGANLoadError, match=rf"missing/bigvgan_generator.pt: .*\n.*missing keys: {key}\n.*download both"):
        load_bigvgan(missing)
    key = "ups.1.0.weight_g"
    reshaped = _rewrite(good, tmp_path / "reshaped", lambda s: {**s, key: torch.ones(8, 1, 1)})
    with pytest.raises(BigVGANLoadError, match=rf"shape mismatches: {key}: file \(8, 1, 1\), model \(16, 1, 1\)"):
        load_bigvgan(reshaped)

    wrapped = _rewrite(good, tmp_path / "wrapped", lambda s: {**{f"module.{k}": v for k, v in s.items()},
                                                              "module.extra.weight": torch.zeros(2)})
    model, _, report = load_bigvgan(wrapped)
    assert any("1 entries not used by the generator: extra.weight" in line for line in report)
    assert any("'module.' prefix; stripped" in line for line in report)
    ref, _, _ = load_bigvgan(good)
    x = mel(12)
    assert torch.equal(vocode(model, x), vocode(ref, x))

    # A file saved after remove_weight_norm (fused ``weight``) loads too, as upstream allows.
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text((good / "config.json").read_text())
    torch.save({"generator": ref.state_dict()}, fused / "bigvgan_generator.pt")
    model, _, report = load_bigvgan(fused)
    assert any("stored fused" in line for line in report)
    assert torch.equal(vocode(model, x), vocode(ref, x))

    with pytest.raises(BigVGANLoadError, match="nope/config.json: not found"):
        load_bigvgan(tmp_path / "nope")
    torch.save(ref.state_dict(), tmp_path / "wrapped" / "bigvgan_generator.pt")  # bare state dict, no "generator"
    with pytest.raises(BigVGANLoadError, match="no 'generator' state dict"):
        load_bigvgan(tmp_path / "wrapped")


def test_vocode_is_deterministic_clamped_and_batch_rows_equal_single_rows(tmp_path):
    model, _, _ = load_bigvgan(make_random_bigvgan(tmp_path / "voc", tiny_bigvgan_config(), seed=2))
    x = mel(30, rows=3, seed=5)
    wav = vocode(model, x)
    assert wav.shape == (3, 30 * 256) and wav.dtype == torch.float32
    assert vocode(model, x).numpy().tobytes() == wav.numpy().tobytes()
    for b in range(3):
        torch.testing.assert_close(vocode(model, x[b : b + 1])[0], wav[b], rtol=0, atol=1e-6)
    assert not torch.allclose(wav[0], wav[1])
    with pytest.raises(ValueError, match=r"mel must be \(B, 80, T\)"):
        vocode(model, x[:, :40])

    # The output is clamped (use_tanh_at_final false), as upstream's final layer does.
    with torch.no_grad():
        model.conv_post.weight.mul_(1e4)
    loud = vocode(model, x)
    assert loud.abs().max() == 1.0 and (loud.abs() == 1.0).any()
