"""indextts.codec: safe strict loading of DAC weights, exact batched encoding, the demo codec."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch

from indextts.audio.dac import DEMO_CODEC_KWARGS, CodecLoadError, encode_batch, load_codec, make_demo_codec
from indextts.codes import CodecConfig, resolve_device
from indextts.config import ConfigError, get_section
from indextts.files import sha256_file

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import dac


pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # DAC's old weight_norm API
    pytest.mark.usefixtures("one_torch_thread"),
]


@pytest.fixture(scope="module")
def demo_weights(tmp_path_factory):
    return make_demo_codec(tmp_path_factory.mktemp("codec") / "dac_tiny.pth")


def _dac_alone(model, wave: torch.Tensor) -> torch.Tensor:
    """DAC's own API on one utterance: preprocess (right-pad to a hop) + encode."""
    with torch.inference_mode():
        _, codes, *_ = model.encode(model.preprocess(wave[None, None], model.sample_rate))
    return codes[0]


def _batch(waves: list[torch.Tensor]) -> torch.Tensor:
    x = torch.zeros(len(waves), 1, max(len(w) for w in waves))
    for i, w in enumerate(waves):
        x[i, 0, : len(w)] = w
    return x


def test_demo_codec_is_dac_format_deterministic_and_safe(demo_weights, tmp_path):
    again = make_demo_codec(tmp_path / "other_name.pth")
    assert sha256_file(again) == sha256_file(demo_weights)  # same seed, same bytes, any file name
    assert sha256_file(make_demo_codec(tmp_path / "s1.pth", seed=1)) != sha256_file(demo_weights)
    blob = torch.load(demo_weights, map_location="cpu", weights_only=True)
    assert set(blob) == {"state_dict", "metadata"}
    assert blob["metadata"]["kwargs"]["encoder_rates"] == DEMO_CODEC_KWARGS["encoder_rates"]
    # DAC's own loader reads it too: it is DAC's format, not ours.
    ref = dac.DAC.load(str(demo_weights))
    model, info = load_codec(demo_weights)
    assert (info.sample_rate, info.hop_length, info.n_q, info.codebook_size) == (16000, 320, 3, 16)
    assert info.frame_rate == 50.0
    assert info.weights_sha256 == sha256_file(demo_weights)
    assert ref.sample_rate == info.sample_rate and ref.n_codebooks == info.n_q


def _save_blob(path, blob):
    buf = io.BytesIO()
    torch.save(blob, buf)
    path.write_bytes(buf.getvalue())
    return path


def test_load_checks_every_key_and_shape(demo_weights, tmp_path):
    blob = torch.load(demo_weights, map_location="cpu", weights_only=True)
    state = blob["state_dict"]
    dropped = dict(state)
    del dropped["encoder.block.0.bias"]
    # DAC.load would take this file without a word (strict=False) and leave that bias random.
    dac.DAC.load(str(_save_blob(tmp_path / "missing.pth", {**blob, "state_dict": dropped})))
    with pytest.raises(CodecLoadError, match=r"missing keys: encoder\.block\.0\.bias"):
        load_codec(tmp_path / "missing.pth")
    extra = {**state, "encoder.extra.weight": torch.zeros(2)}
    with pytest.raises(CodecLoadError, match=r"unexpected keys: encoder\.extra\.weight"):
        load_codec(_save_blob(tmp_path / "extra.pth", {**blob, "state_dict": extra}))
    wrong = {**state, "encoder.block.0.bias": torch.zeros(3)}
    with pytest.raises(CodecLoadError, match=r"shape mismatches: encoder\.block\.0\.bias: file \(3,\)"):
        load_codec(_save_blob(tmp_path / "shape.pth", {**blob, "state_dict": wrong}))
    with pytest.raises(CodecLoadError, match="not a DAC weights file"):
        load_codec(_save_blob(tmp_path / "bare.pth", state))
    with pytest.raises(CodecLoadError, match="not found"):
        load_codec(tmp_path / "nowhere.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a zip")
    with pytest.raises(CodecLoadError, match="junk.pth"):
        load_codec(tmp_path / "junk.pth")


def test_load_refuses_pickled_code(tmp_path):
    # DAC's save() default is a torch.package: the model pickled with its code. Unsafe to load.
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dac.DAC(**DEMO_CODEC_KWARGS).save(str(tmp_path / "package.pth"))
    with pytest.raises(CodecLoadError, match="weights_only"):
        load_codec(tmp_path / "package.pth")


def test_loaded_model_encodes_like_dac(demo_weights):
    """Folding weight norm once gives the same codes as DAC's per-call weight-norm hook."""
    ref = dac.DAC.load(str(demo_weights)).eval()
    model, info = load_codec(demo_weights)
    wave = torch.randn(12345, generator=torch.Generator().manual_seed(3)) * 0.3
    (ours,) = encode_batch(model, wave[None, None], [len(wave)])
    assert torch.equal(ours, _dac_alone(ref, wave))
    assert ours.shape == (3, math.ceil(12345 / 320))


def _naive_batch(model, waves):
    """What plain zero padding gives (the bug encode_batch exists to avoid)."""
    hop = int(model.hop_length)
    frames = [math.ceil(len(w) / hop) for w in waves]
    x = torch.nn.functional.pad(_batch(waves), (0, max(frames) * hop - max(len(w) for w in waves)))
    with torch.inference_mode():
        _, codes, *_ = model.encode(x)
    return [codes[i, :, :f] for i, f in enumerate(frames)]


@pytest.mark.parametrize("kwargs", [DEMO_CODEC_KWARGS, {**DEMO_CODEC_KWARGS, "encoder_rates": [2, 3, 5], "decoder_rates": [5, 3, 2]}])
def test_batched_codes_equal_dac_alone_frame_for_frame(kwargs):
    """Utterances of very different lengths in one zero-padded batch give exactly the codes
    DAC's preprocess + encode gives each alone, while plain padding changes frames. Odd
    strides (3, 5: DAC's 24/44 kHz models have them) included."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = dac.DAC(**kwargs).eval()
    g = torch.Generator().manual_seed(7)
    hop = int(ref.hop_length)
    lengths = [16000 * 3 + 17, 16000, 9 * hop, 5000, 1, hop - 1, 4 * hop + 1]
    waves = [torch.randn(n, generator=g) * 0.3 for n in lengths]
    alone = [_dac_alone(ref, w) for w in waves]
    batched = encode_batch(ref, _batch(waves), lengths)
    for n, a, b in zip(lengths, alone, batched):
        assert b.shape == a.shape == (kwargs["n_codebooks"], math.ceil(n / hop))
        assert torch.equal(a, b), f"length {n}: {(a != b).any(0).sum().item()} frames differ"
    naive = _naive_batch(ref, waves)
    changed = sum(int((a != b).any(0).sum()) for a, b in zip(alone, naive))
    assert changed > 0  # padding does reach the last frames; the mask is what makes it exact


def test_n_quantizers_keeps_the_first_codebooks(demo_weights):
    model, _ = load_codec(demo_weights)
    wave = torch.randn(8000, generator=torch.Generator().manual_seed(1))
    (full,) = encode_batch(model, wave[None, None], [8000])
    (two,) = encode_batch(model, wave[None, None], [8000], n_quantizers=2)
    assert torch.equal(full[:2], two)
    with pytest.raises(ConfigError, match="codec.n_quantizers"):
        load_codec(demo_weights, n_quantizers=4)


def test_config_and_device():
    cfg = get_section(CodecConfig, {"codec": {"weights": "w.pth"}}, "codec")
    assert cfg.device == "auto" and cfg.n_quantizers is None
    with pytest.raises(ConfigError, match="codec.weights: required"):
        get_section(CodecConfig, {"codec": {}}, "codec")
    with pytest.raises(ConfigError, match="codec.device"):
        get_section(CodecConfig, {"codec": {"weights": "w", "device": "tpu"}}, "codec")
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no GPU"):
            resolve_device("cuda")


def test_make_demo_codec_cli(tmp_path, capsys):
    from indextts.cli import main

    assert main(["make-demo-codec", "--output", str(tmp_path / "c.pth")]) == 0
    assert "50 frames/s" in capsys.readouterr().out
    assert np.isclose(load_codec(tmp_path / "c.pth")[1].frame_rate, 50.0)
