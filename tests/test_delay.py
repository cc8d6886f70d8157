"""Every DAC codebook: the delay pattern, K summed embeddings and K heads, per-codebook losses,
generation under the pattern, and decoding codes back to audio through the pipeline's DAC."""

from __future__ import annotations

import warnings

import pytest
import torch

from indextts.model import build_model, masked_cross_entropy, model_config
from indextts.model.delay import delay, undelay
from tests.test_model import make_batch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_batch_k(cfg, *, K: int, B=2, Lt=8, T=16, Tc=30, seed=3):
    """Two rows of different real lengths, K codebooks of random codes (junk in the padding)."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        text_ids=torch.randint(2, cfg.text_vocab_size, (B, Lt), generator=g),
        text_lengths=torch.tensor([Lt, Lt - 3][:B]),
        codes=torch.randint(0, cfg.number_mel_codes - 2, (B, K, T), generator=g),
        code_lengths=torch.tensor([T, T - 7][:B]),
        cond_feats=torch.randn(B, Tc, cfg.cond_feat_dim, generator=g),
        cond_lengths=torch.tensor([Tc, Tc - 11][:B]),
    )


def tiny_k(K: int, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(model_config("tiny", n_codebooks=K))


# --- delay / undelay ----------------------------------------------------------------------------


@pytest.mark.parametrize("K", range(1, 13))
def test_undelay_inverts_delay(K: int) -> None:
    g = torch.Generator().manual_seed(K)
    for shape in [(K, 1), (K, 7), (3, K, 1), (4, K, 25)]:
        x = torch.randint(0, 1024, shape, generator=g)
        d = delay(x, pad=-1, pad_after=-2)
        assert d.shape == (*shape[:-1], shape[-1] + K - 1)
        assert torch.equal(undelay(d), x)
        for k in range(K):  # codebook k starts k steps late; the opened steps hold the pads
            assert torch.equal(d[..., k, k : k + shape[-1]], x[..., k, :])
            assert (d[..., k, :k] == -1).all() and (d[..., k, k + shape[-1] :] == -2).all()
    # A ragged batch: each row delayed in the batch equals that row delayed alone, on its frames.
    lengths = [1, 9, 4]
    x = torch.randint(0, 1024, (3, K, 9), generator=g)
    d = delay(x, pad=-1)
    assert torch.equal(undelay(d), x)
    for b, n in enumerate(lengths):
        alone = delay(x[b, :, :n], pad=-1)
        for k in range(K):
            assert torch.equal(d[b, k, k : k + n], alone[k, k : k + n])
    with pytest.raises(ValueError, match="cannot hold"):
        undelay(torch.zeros(K + 1, K))


def test_prepare_codes_builds_the_delay_pattern() -> None:
    m = tiny_k(3)
    s, e = m.cfg.start_mel_token, m.cfg.stop_mel_token
    codes = torch.tensor([[[1, 2], [3, 4], [5, 6]]])  # B=1, K=3, T=2
    inputs, targets, mask = m.prepare_codes(codes, torch.tensor([2]))
    assert inputs.shape == (1, 3, 2 + 3 + 1)  # T + K + 1
    assert inputs[0].tolist() == [[s, 1, 2, e, e, e], [s, s, 3, 4, e, e], [s, s, s, 5, 6, e]]
    assert targets[0].tolist() == [[1, 2, e, e, e, e], [s, 3, 4, e, e, e], [s, s, 5, 6, e, e]]
    # codebook k's real targets: its two codes and its stop, from step k on
    assert mask[0].int().tolist() == [[1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]]
    # a row of one frame out of two: everything after its stop is padding
    inputs, targets, mask = m.prepare_codes(codes, torch.tensor([1]))
    assert inputs[0].tolist() == [[s, 1, e, e, e, e], [s, s, 3, e, e, e], [s, s, s, 5, e, e]]
    assert mask[0].sum(-1).tolist() == [2, 2, 2]


# --- K = 1 is IndexTTS2 exactly --------------------------------------------------------------------

# Before the delay pattern landed (commit 6b772fa), seed 0's tiny model on make_batch(seed=0) in
# eval mode gave these, in float32 on the CPU.
K1_LOSS, K1_TEXT_LOSS, K1_MEL_LOSS = 4.917213439941406, 5.637828826904297, 4.35343074798584


def test_one_codebook_forward_is_unchanged() -> None:
    m = tiny_k(1).eval()
    b = make_batch(m.cfg, seed=0)
    out = m(**b)  # the [B, T] layout
    assert (out.loss.item(), out.text_loss.item(), out.mel_loss.item()) == pytest.approx(
        (K1_LOSS, K1_TEXT_LOSS, K1_MEL_LOSS), abs=1e-6)
    again = m(**dict(b, codes=b["codes"][:, None]))  # the data layout [B, 1, T]
    assert torch.equal(again.loss, out.loss) and torch.equal(again.mel_losses, out.mel_loss[None])
    assert torch.equal(again.mel_logits[:, 0], out.mel_logits)
    assert not any(k.startswith("extra_") for k in m.state_dict())


def test_extra_codebooks_add_tables_and_heads_only() -> None:
    one, three = tiny_k(1), tiny_k(3)
    sd1, sd3 = one.state_dict(), three.state_dict()
    extra = sorted(set(sd3) - set(sd1))
    assert set(sd1) <= set(sd3)
    assert extra == ["extra_mel_embedding.cb1.weight", "extra_mel_embedding.cb2.weight",
                     "extra_mel_head.cb1.bias", "extra_mel_head.cb1.weight",
                     "extra_mel_head.cb2.bias", "extra_mel_head.cb2.weight"]
    V, d = three.cfg.number_mel_codes, three.cfg.model_dim
    assert sd3["extra_mel_embedding.cb2.weight"].shape == (V, d) and sd3["extra_mel_head.cb1.weight"].shape == (V, d)
    # made last, so the same seed gives the shared weights of the one-codebook model
    assert all(torch.equal(sd1[k], sd3[k]) for k in sd1)


# --- K > 1: forward, losses, training ------------------------------------------------------------


def test_per_codebook_losses_are_masked_means_averaged() -> None:
    m = tiny_k(3).eval()
    b = make_batch_k(m.cfg, K=3)
    out = m(**b)
    B, K, T = b["codes"].shape
    L = T + K + 1
    assert out.mel_logits.shape == (B, K, L, m.cfg.number_mel_codes)
    assert out.mel_targets.shape == out.mel_mask.shape == (B, K, L)
    want = torch.stack([masked_cross_entropy(out.mel_logits[:, k], out.mel_targets[:, k], out.mel_mask[:, k])
                        for k in range(K)])
    torch.testing.assert_close(out.mel_losses, want)
    torch.testing.assert_close(out.mel_loss, want.mean())
    torch.testing.assert_close(out.loss, 0.1 * out.text_loss + 1.0 * out.mel_loss)
    # each codebook has the row's frames + its stop as targets; n_mel_tokens counts them once
    assert out.mel_mask.sum(-1).tolist() == [[int(n) + 1] * K for n in b["code_lengths"]]
    assert out.n_mel_tokens.item() == int((b["code_lengths"] + 1).sum())
    assert out.mel_losses.grad_fn is not None  # not detached: the trainer may weight codebooks


def test_padding_and_causality_with_three_codebooks() -> None:
    m = tiny_k(3).eval()
    b = make_batch_k(m.cfg, K=3)
    base = m(**b)
    junk = b["codes"].clone()
    junk[1, :, int(b["code_lengths"][1]):] = 7  # padding values never matter
    torch.testing.assert_close(m(**dict(b, codes=junk)).loss, base.loss, rtol=0, atol=1e-6)
    # Changing frame t of codebook 2 changes no prediction made before that code is fed back in
    # (step t + 2 + 1 on the input side): the delay pattern is causal per codebook.
    t = 5
    moved = b["codes"].clone()
    moved[:, 2, t] = (moved[:, 2, t] + 1) % 60
    out = m(**dict(b, codes=moved))
    step_fed = t + 2 + 1  # input position of codebook 2's frame t
    torch.testing.assert_close(out.mel_logits[:, :, :step_fed], base.mel_logits[:, :, :step_fed])
    assert not torch.allclose(out.mel_logits[:, :, step_fed:], base.mel_logits[:, :, step_fed:])


def test_forward_checks_the_codebook_count() -> None:
    m = tiny_k(3)
    b = make_batch_k(m.cfg, K=2)
    with pytest.raises(ValueError, match=r"codes must be \[B, 3, T\]"):
        m(**b)
    with pytest.raises(ValueError, match=r"codes must be \[B, 3, T\]"):
        m(**dict(b, codes=b["codes"][:, 0]))
    limit = m.cfg.max_code_frames
    assert limit == m.cfg.max_mel_tokens - 2
    long = dict(b, codes=torch.zeros(2, 3, limit + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="less 2 delay steps"):
        m(**long)


# Measured (torch 2.14, CPU, seeds 0/1/2): every codebook's loss is about 4.3 at step 0, 1.2 at
# step 20, 0.33 at step 40 and 0.10-0.12 at step 60. The threshold leaves room for kernel
# differences, not for a broken codebook.
OVERFIT_STEPS = 61
OVERFIT_LOSS = 0.3


def test_three_codebooks_overfit_a_batch_and_generate_it_back() -> None:
    m = tiny_k(3)
    b = make_batch_k(m.cfg, K=3)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(OVERFIT_STEPS):
        out = m(**b)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else out.mel_losses.detach().clone()
    assert (first > 4.0).all()
    assert (out.mel_losses < OVERFIT_LOSS).all(), f"per-codebook losses {out.mel_losses.tolist()}"
    # Greedy generation reproduces what it learned: all three codebooks, undelayed, and the stop.
    m.eval()
    for r in range(2):
        lt, n, tc = (int(b[k][r]) for k in ("text_lengths", "code_lengths", "cond_lengths"))
        codes, lengths = m.generate_codes(b["text_ids"][r : r + 1, :lt], b["cond_feats"][r : r + 1, :tc],
                                          torch.tensor([tc]), temperature=0, max_new_tokens=40)
        assert lengths.tolist() == [n] and codes.shape == (1, 3, n)
        assert torch.equal(codes[0], b["codes"][r, :, :n])


# --- generation -----------------------------------------------------------------------------------


def test_greedy_generation_with_cache_equals_recomputation() -> None:
    m = tiny_k(3).eval()
    b = make_batch_k(m.cfg, K=3)
    text, feats, fl = b["text_ids"][:, :5], b["cond_feats"], b["cond_lengths"]
    with torch.no_grad():  # stop biased up so that rows end at different frames
        m.mel_head.bias[m.cfg.stop_mel_token] += 0.5
    cached, n1 = m.generate_codes(text, feats, fl, temperature=0, max_new_tokens=30)
    full, n2 = m.generate_codes(text, feats, fl, temperature=0, max_new_tokens=30, use_cache=False)
    assert torch.equal(n1, n2) and torch.equal(cached, full)
    assert cached.shape[:2] == (2, 3) and 0 < int(n1.min()) < int(n1.max())  # one row stops, one runs on
    # Teacher forcing on the generated codes: each sampled code is the argmax of the forward pass
    # (start banned everywhere, stop banned for codebooks 1..K-1, as in generation).
    for r in range(2):
        n = int(n1[r])
        out = m(text[r : r + 1], torch.tensor([5]), cached[r : r + 1, :, :n], n1[r : r + 1], feats[r : r + 1],
                fl[r : r + 1])
        logits = out.mel_logits[0].clone()  # (K, L, V)
        logits[..., m.cfg.start_mel_token] = float("-inf")
        logits[1:, :, m.cfg.stop_mel_token] = float("-inf")
        for k in range(3):
            assert logits[k, k : k + n].argmax(-1).tolist() == cached[r, k, :n].tolist()
        if n < 30:  # codebook 0 chose to stop right after its last frame
            assert logits[0, n].argmax().item() == m.cfg.stop_mel_token
        assert (cached[r, :, n:] == m.cfg.stop_mel_token).all()


def test_sampling_is_seeded_per_codebook_and_yields_codes_only() -> None:
    m = tiny_k(4).eval()
    b = make_batch_k(m.cfg, K=4, B=1)
    args = (b["text_ids"], b["cond_feats"], b["cond_lengths"])
    runs = [m.generate_codes(*args, temperature=1.0, top_k=8, max_new_tokens=25,
                             generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(runs[0][0], runs[1][0]) and not torch.equal(runs[0][0], runs[2][0])
    codes, n = runs[0]
    assert codes.shape == (1, 4, int(n[0])) and int(n[0]) <= 25
    assert int(codes.max()) < m.cfg.start_mel_token  # no start/stop inside a row's frames


# --- decoding ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_codec_and_utterance(tmp_path_factory):
    """The demo's tiny DAC and one espeak-ng utterance of the demo corpus."""
    import json

    from indextts.audio.dac import load_codec, make_demo_codec
    from indextts.demo import DemoConfig, build_demo_corpus
    from indextts.features import load_audio

    root = tmp_path_factory.mktemp("demo")
    weights = make_demo_codec(root / "dac_tiny.pth")
    corpus = build_demo_corpus(DemoConfig(enabled=True, n_utterances=1, n_speakers=1, dirty=False, workers=1),
                               root / "corpus")
    row = json.loads(corpus.manifest.read_text(encoding="utf-8").splitlines()[0])
    path = corpus.manifest.parent / row["audio"]  # relative to the corpus folder
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model, info = load_codec(weights)
    return weights, model, load_audio(path, info.sample_rate)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_decode_codes_equals_dac_decoding(demo_codec_and_utterance, capsys) -> None:
    from indextts.audio.dac import decode_codes, encode_batch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import dac
    weights, model, wave = demo_codec_and_utterance
    (codes,) = encode_batch(model, wave[None, None], [wave.shape[0]])  # ground truth (n_q, T)
    ours = decode_codes(model, codes)
    reference = dac.DAC.load(str(weights)).eval()  # DAC's own loader and weight-norm hooks
    with torch.inference_mode():
        z, *_ = reference.quantizer.from_codes(codes[None])
        want = reference.decode(z)[0, 0]
    assert ours.shape == want.shape == (codes.shape[1] * model.hop_length,)
    assert torch.equal(ours, want)
    assert torch.equal(decode_codes(model, codes[None])[0], ours)  # batched

    with pytest.raises(ValueError, match="1 of the codec's 3 codebooks"):
        decode_codes(model, codes[:1])
    first = decode_codes(model, codes[:1], n_codebooks_ok=True)
    assert "decoding 1 of 3 codebooks" in capsys.readouterr().err
    assert first.shape == ours.shape and not torch.equal(first, ours)
    with pytest.raises(ValueError, match="the codec has 3"):
        decode_codes(model, torch.cat([codes, codes[:1]]))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 16\)"):
        decode_codes(model, torch.full_like(codes, 16))  # a stop id is not a code
