"""indextts.audio.campplus: the released CAM++ key list, strict loading, IndexTTS2's fbank, and an
exact, batch-independent style vector."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from indextts.audio.campplus import (
    CAMPPLUS_MIN_SAMPLES,
    CAMLayer,
    CAMPPlus,
    CampplusConfig,
    CampplusLoadError,
    campplus_fbank,
    load_campplus,
    make_random_campplus,
    style_vector,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The state dict upstream's strict load wants (copies of shared/reference/).
DATA = Path(__file__).resolve().parent / "data"
TINY = CampplusConfig.tiny()


def read_tsv(name: str) -> list[list[str]]:
    lines = (DATA / name).read_text().splitlines()
    return [line.split("\t") for line in lines[1:] if line]


def audio(n: int, seed: int = 0, rows: int | None = None) -> torch.Tensor:
    """A tone with noise in [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    shape = (n,) if rows is None else (rows, n)
    t = torch.arange(n) / 16000
    return (0.3 * torch.sin(2 * math.pi * 180 * t) + 0.05 * torch.randn(shape, generator=g)).clamp(-1, 1)


def test_released_size_campplus_matches_the_reference_key_list_in_order():
    ref = read_tsv("campplus_state_dict.tsv")
    assert len(ref) == 937 and sum(k.endswith("num_batches_tracked") for k, _, _ in ref) == 122
    with torch.device("meta"):
        model = CAMPPlus()
    ours = [[k, ",".join(map(str, v.shape)), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
    assert ours == ref  # names, shapes (0-dim counters: empty), dtypes and the file's order
    params = {name for name, _ in model.named_parameters()}
    assert {k for k, kind in read_tsv("campplus_state_dict_kinds.tsv") if kind == "param"} == params
    assert sum(p.numel() for p in model.parameters()) == 6_848_544
    assert CampplusConfig.from_state_dict(model.state_dict()) == CampplusConfig()


def test_fbank_is_torchaudio_kaldi_fbank_with_indextts2_options_minus_its_mean():
    from torchaudio.compliance import kaldi

    wav = audio(16000 + 123, rows=2)
    feats = campplus_fbank(wav)
    assert feats.shape == (2, 1 + (16123 - 400) // 160, 80) and feats.dtype == torch.float32
    for b in range(2):
        # infer_v2's call with every Kaldi default spelled out.
        ref = kaldi.fbank(wav[b : b + 1], num_mel_bins=80, dither=0.0, sample_frequency=16000, frame_length=25.0,
                          frame_shift=10.0, window_type="povey", preemphasis_coefficient=0.97, remove_dc_offset=True,
                          round_to_power_of_two=True, snip_edges=True, low_freq=20.0, high_freq=0.0, use_log_fbank=True,
                          use_power=True, use_energy=False, energy_floor=1.0, raw_energy=True, htk_compat=False,
                          subtract_mean=False)
        ref = ref - ref.mean(dim=0, keepdim=True)
        assert torch.equal(feats[b], ref)
        assert torch.equal(campplus_fbank(wav[b]), ref)  # 1-D input gives (T, 80)
    assert feats.mean(dim=1).abs().max() < 1e-4
    with pytest.raises(ValueError, match="shorter than one fbank window"):
        campplus_fbank(torch.zeros(399))


def test_segment_mean_averages_each_segment_and_the_short_last_one():
    layer = CAMLayer(4, 2, 3, 1, segment_frames=5)
    x = torch.randn(2, 4, 12)
    want = torch.cat([x[..., a:b].mean(-1, keepdim=True).expand(-1, -1, b - a) for a, b in ((0, 5), (5, 10), (10, 12))], dim=-1)
    torch.testing.assert_close(layer.segment_mean(x), want, rtol=0, atol=1e-6)


def test_random_campplus_round_trips_strictly_with_sizes_read_off_the_file(tmp_path):
    path = make_random_campplus(tmp_path / "campplus.bin", TINY, seed=3)
    again = make_random_campplus(tmp_path / "again.bin", TINY, seed=3)
    assert path.read_bytes() == again.read_bytes()  # same seed, same bytes
    state = torch.load(path, weights_only=True)
    assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())  # the released layout

    model, report = load_campplus(path)  # sizes from the file
    assert model.cfg == TINY and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert report == [f"{path}: CAM++ of non-released sizes {TINY}"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k

    direct = CAMPPlus(TINY)
    direct.load_state_dict(state)
    wav = audio(40000)  # two CAM segments after the stride-2 TDNN
    with torch.no_grad():
        want = direct.eval()(campplus_fbank(wav)[None])
    explicit, _ = load_campplus(path, TINY)
    assert torch.equal(style_vector(model, wav), want)
    assert torch.equal(style_vector(explicit, wav), want)


def _rewrite(src: Path, dst: Path, edit) -> Path:
    """``src``'s state dict through ``edit`` (which returns the new dict) saved as ``dst``."""
    torch.save(edit(torch.load(src, weights_only=True)), dst)
    return dst


def test_strict_load_names_missing_and_reshaped_keys_and_reports_unused(tmp_path):
    good = make_random_campplus(tmp_path / "good.bin", TINY)
    key = "xvector.block2.tdnnd3.cam_layer.linear2.bias"
    missing = _rewrite(good, tmp_path / "missing.bin", lambda s: {k: v for k, v in s.items() if k != key})
    with pytest.raises(CampplusLoadError, match=rf"missing.bin: .*\n.*missing keys: {key}\n.*re-download"):
        load_campplus(missing, TINY)
    reshaped = _rewrite(good, tmp_path / "reshaped.bin", lambda s: {**s, key: torch.zeros(5)})
    with pytest.raises(CampplusLoadError, match=rf"shape mismatches: {key}: file \(5,\), model \(4,\)"):
        load_campplus(reshaped, TINY)
    with pytest.raises(CampplusLoadError, match="shape mismatches: head.conv1.weight"):
        load_campplus(good, CampplusConfig())  # the released sizes asked for, a tiny file given

    # DataParallel's "module." prefix is stripped; an extra entry is reported, not fatal.
    wrapped = _rewrite(good, tmp_path / "wrapped.bin",
                       lambda s: {**{f"module.{k}": v for k, v in s.items()}, "module.classifier.weight": torch.zeros(3)})
    model, report = load_campplus(wrapped, TINY)
    assert any("1 entries not used by CAM++: classifier.weight" in line for line in report)
    assert any("'module.' prefix; stripped" in line for line in report)
    ref, _ = load_campplus(good, TINY)
    wav = audio(8000)
    assert torch.equal(style_vector(model, wav), style_vector(ref, wav))

    # BatchNorm counters may be absent (the released file may lack them): loaded, reported.
    bare = _rewrite(good, tmp_path / "bare.bin", lambda s: {k: v for k, v in s.items() if not k.endswith("num_batches_tracked")})
    model, report = load_campplus(bare, TINY)
    assert any("num_batches_tracked counters absent" in line for line in report)
    assert torch.equal(style_vector(model, wav), style_vector(ref, wav))

    with pytest.raises(CampplusLoadError, match="not found.*campplus_cn_common.bin"):
        load_campplus(tmp_path / "nope.bin")
    torch.save([1, 2], tmp_path / "list.bin")
    with pytest.raises(CampplusLoadError, match="not a state dict"):
        load_campplus(tmp_path / "list.bin")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.bin")
    with pytest.raises(CampplusLoadError, match="not a CAM.. state dict"):
        load_campplus(tmp_path / "other.bin")


def test_style_vector_is_deterministic_and_batch_rows_equal_single_rows(tmp_path):
    model, _ = load_campplus(make_random_campplus(tmp_path / "c.bin", TINY, seed=1))
    wav = audio(24000, seed=2, rows=3)
    batch = style_vector(model, wav)
    assert batch.shape == (3, 192) and batch.dtype == torch.float32
    assert style_vector(model, wav).numpy().tobytes() == batch.numpy().tobytes()
    for b in range(3):
        one = style_vector(model, wav[b])
        assert one.shape == (1, 192)
        torch.testing.assert_close(one[0], batch[b], rtol=0, atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])  # the rows do differ

    assert style_vector(model, audio(CAMPPLUS_MIN_SAMPLES)).isfinite().all()
    with pytest.raises(ValueError, match="too short for CAM"):
        style_vector(model, audio(CAMPPLUS_MIN_SAMPLES - 1))
    with pytest.raises(ValueError, match="training mode"):
        style_vector(model.train(), wav)
