"""Synthesis: generation under the KV cache and in ragged batches, the sampling processors,
``indextts synthesize`` from a checkpoint folder alone, batch mode, the sample list."""

from __future__ import annotations

import pytest
import torch

from indextts.model import build_model, model_config
from indextts.model.unified_voice import penalise_repeats, warp_logits

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOGIT_TOL = 1e-5


def tiny_k(K: int, seed: int = 0, stop_bias: float = 0.0):
    """A tiny model; ``stop_bias`` raises the stop logit so rows end at different frames."""
    torch.manual_seed(seed)
    m = build_model(model_config("tiny", n_codebooks=K)).eval()
    with torch.no_grad():
        m.mel_head.bias[m.cfg.stop_mel_token] += stop_bias
    return m


def ragged_inputs(cfg, *, text_lengths=(7, 3, 5), cond_lengths=(40, 25, 33), seed=1):
    """Rows with different text and prompt lengths, right-padded (junk in the padding)."""
    g = torch.Generator().manual_seed(seed)
    B, Lt, Tc = len(text_lengths), max(text_lengths), max(cond_lengths)
    return dict(
        text_ids=torch.randint(2, cfg.text_vocab_size, (B, Lt), generator=g),
        text_lengths=torch.tensor(text_lengths),
        cond_feats=torch.randn(B, Tc, cfg.cond_feat_dim, generator=g),
        cond_lengths=torch.tensor(cond_lengths),
        emo_feats=torch.randn(B, Tc, cfg.cond_feat_dim, generator=g),
        emo_lengths=torch.tensor(cond_lengths[1:] + cond_lengths[:1]),
    )


def row(inputs: dict, b: int) -> dict:
    """Row ``b`` alone, cut to its real lengths (what a one-row call gets)."""
    n, c, e = (int(inputs[k][b]) for k in ("text_lengths", "cond_lengths", "emo_lengths"))
    return dict(text_ids=inputs["text_ids"][b : b + 1, :n], cond_feats=inputs["cond_feats"][b : b + 1, :c],
                cond_lengths=inputs["cond_lengths"][b : b + 1], emo_feats=inputs["emo_feats"][b : b + 1, :e],
                emo_lengths=inputs["emo_lengths"][b : b + 1])


def generate(m, inputs, **kw):
    """generate_codes with its per-step raw logits recorded: (codes, lengths, [logits per step])."""
    steps: list[torch.Tensor] = []
    a = dict(inputs)
    codes, n = m.generate_codes(a.pop("text_ids"), a.pop("cond_feats"), a.pop("cond_lengths"),
                                a.pop("emo_feats", None), a.pop("emo_lengths", None), **a,
                                on_step=lambda s, logits: steps.append(logits.clone()), **kw)
    return codes, n, steps


# --- generation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [1, 3])
def test_cached_greedy_equals_recomputation_and_teacher_forcing_at_every_step(K: int) -> None:
    """The cache, the position tables and the text stop token are exactly those of training:
    every step's logits equal recomputation without the cache and the teacher-forced forward."""
    m = tiny_k(K, stop_bias=1.0)
    x = row(ragged_inputs(m.cfg), 0)
    codes, n, cached = generate(m, x, temperature=0, max_new_tokens=30)
    codes2, n2, full = generate(m, x, temperature=0, max_new_tokens=30, use_cache=False)
    assert torch.equal(n, n2) and torch.equal(codes, codes2)
    # frames, then the stop step (K = 1) or the K - 1 steps the delayed codebooks still need
    assert len(cached) == len(full) == int(n[0]) + max(K - 1, 1)
    for a, b in zip(cached, full):
        assert (a - b).abs().max().item() < LOGIT_TOL
    # Teacher forcing on what was generated: step s of generation is mel position s of training.
    T = int(n[0])
    out = m(x["text_ids"], torch.tensor([x["text_ids"].shape[1]]), codes, n, x["cond_feats"], x["cond_lengths"],
            x["emo_feats"], x["emo_lengths"])
    tf = out.mel_logits[0]  # (K, L, V): codes came as [B, K, T]
    for s, step_logits in enumerate(cached):
        assert (step_logits[0] - tf[:, s]).abs().max().item() < LOGIT_TOL, f"step {s}"
    assert T < 30 and int(tf[0, T].argmax()) == m.cfg.stop_mel_token  # it stopped on its own


@pytest.mark.parametrize("K, seed", [(1, 2), (3, 0)])
def test_ragged_batch_gives_every_row_what_it_gets_alone(K: int, seed: int) -> None:
    m = tiny_k(K, seed=seed, stop_bias=0.3)
    x = ragged_inputs(m.cfg)
    codes, n, steps = generate(m, x, temperature=0, max_new_tokens=40)
    assert len(set(n.tolist())) > 1  # rows end at different frames (one at the cap)
    for b in range(3):
        c1, n1, alone = generate(m, row(x, b), temperature=0, max_new_tokens=40)
        assert int(n1[0]) == int(n[b]) and torch.equal(c1[0], codes[b, :, : int(n1[0])])
        assert (codes[b, :, int(n1[0]) :] == m.cfg.stop_mel_token).all()
        for s, logits in enumerate(alone):
            assert (steps[s][b] - logits[0]).abs().max().item() < LOGIT_TOL, f"row {b} step {s}"
    # Sampling with one generator per row: the same codes as each row sampled alone.
    kw = dict(temperature=0.8, top_k=30, top_p=0.8, repetition_penalty=10.0, max_new_tokens=40)

    def gens(rows):
        return [torch.Generator().manual_seed(100 + b) for b in rows]

    codes, n, _ = generate(m, x, generator=gens(range(3)), **kw)
    for b in range(3):
        c1, n1, _ = generate(m, row(x, b), generator=gens([b]), **kw)
        assert int(n1[0]) == int(n[b]) and torch.equal(c1[0], codes[b, :, : int(n1[0])])


def test_sampling_is_seeded_and_stops_at_the_stop_token_or_the_cap() -> None:
    m = tiny_k(3)
    x = row(ragged_inputs(m.cfg), 1)
    kw = dict(temperature=0.8, top_k=30, top_p=0.8, repetition_penalty=10.0, max_new_tokens=25)
    runs = [generate(m, x, generator=torch.Generator().manual_seed(s), **kw)[:2] for s in (5, 5, 6)]
    assert torch.equal(runs[0][0], runs[1][0]) and not torch.equal(runs[0][0], runs[2][0])
    # A stop logit pushed up ends every row at once; pushed down, no row stops before the cap.
    for bias, want in ((50.0, 1), (-50.0, m.frame_limit(25))):
        mm = tiny_k(3, stop_bias=bias)
        codes, n, steps = generate(mm, x, min_new_tokens=1, generator=torch.Generator().manual_seed(0), **kw)
        assert n.tolist() == [want] and codes.shape == (1, 3, want)
        assert len(steps) == want + 2  # never runs past the stop (or the cap) and the K - 1 tail
    assert m.frame_limit(None) == m.frame_limit(10**6) == m.cfg.max_code_frames


def test_repetition_penalty_is_applied_per_codebook_to_what_it_produced() -> None:
    """Greedy with a penalty picks, at every step, the argmax of HF's penalty over the ids that
    codebook already produced in that row (start/stop fills excluded)."""
    m = tiny_k(2)
    x = row(ragged_inputs(m.cfg), 0)
    penalty = 3.0
    codes, n, steps = generate(m, x, temperature=0, repetition_penalty=penalty, max_new_tokens=20)
    plain, _, _ = generate(m, x, temperature=0, max_new_tokens=20)
    assert not torch.equal(plain, codes)  # the penalty changes what greedy picks
    V, T = m.cfg.number_mel_codes, int(n[0])
    seen = torch.zeros(2, V, dtype=torch.bool)
    for s, logits in enumerate(steps):
        lg = logits[0].clone()
        lg[:, m.cfg.start_mel_token] = float("-inf")
        lg[1, m.cfg.stop_mel_token] = float("-inf")
        want = penalise_repeats(lg, seen, penalty).argmax(-1)
        for k in range(2):
            f = s - k
            if 0 <= f < T:
                assert int(codes[0, k, f]) == int(want[k]), f"step {s} codebook {k}"
                seen[k, codes[0, k, f]] = True


def test_processors_equal_huggingface_ones() -> None:
    """Repetition penalty, temperature, top-k and top-p equal transformers' own processors (the
    ones IndexTTS2's inference runs through HF generate)."""
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 66, generator=g) * 3
    ids = torch.randint(0, 66, (6, 9), generator=g)
    seen = torch.zeros(6, 66, dtype=torch.bool).scatter(1, ids, True)
    hf = RepetitionPenaltyLogitsProcessor(10.0)(ids, logits.clone())
    ours = penalise_repeats(logits, seen, 10.0)
    assert torch.allclose(ours, hf)
    for temperature, top_k, top_p in ((0.8, 30, 0.8), (1.3, 0, 0.5), (0.5, 5, 1.0)):
        want = TemperatureLogitsWarper(temperature)(ids, ours.clone())
        if top_k:
            want = TopKLogitsWarper(top_k)(ids, want)
        if top_p < 1:
            want = TopPLogitsWarper(top_p)(ids, want)
        got = warp_logits(ours, temperature, top_k, top_p)
        assert torch.equal(torch.isinf(got), torch.isinf(want))
        assert torch.allclose(got[~torch.isinf(got)], want[~torch.isinf(want)])
        assert (~torch.isinf(got)).sum(-1).min() >= 1


def test_emo_alpha_mixes_the_emotion_prompt_into_the_speaker_prompt() -> None:
    m = tiny_k(1)
    x = row(ragged_inputs(m.cfg), 0)
    spk = m.get_emo_vec(x["cond_feats"], x["cond_lengths"])
    emo = m.get_emo_vec(x["emo_feats"], x["emo_lengths"])
    args = (x["cond_feats"], x["cond_lengths"], x["emo_feats"], x["emo_lengths"])
    assert torch.allclose(m.merge_emo_vec(*args, alpha=0.0), spk, atol=1e-6)
    assert torch.equal(m.merge_emo_vec(*args, alpha=1.0), emo)
    assert torch.allclose(m.merge_emo_vec(*args, alpha=0.3), spk + 0.3 * (emo - spk), atol=1e-6)
    # generation takes it: alpha 0 is the speaker prompt alone
    a, _, _ = generate(m, x, temperature=0, max_new_tokens=15, emo_alpha=0.0)
    b, _, _ = generate(m, {k: v for k, v in x.items() if not k.startswith("emo")}, temperature=0, max_new_tokens=15)
    assert torch.equal(a, b)
