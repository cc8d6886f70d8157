"""Synthesis: generation under the KV cache and in ragged batches, the sampling processors,
``indextts synthesize`` from a checkpoint folder alone, batch mode, the sample list."""

from __future__ import annotations

import shutil
from pathlib import Path

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


# --- indextts synthesize from a checkpoint folder -------------------------------------------------

WORDS = "selam new dehna alem bet sew wuha mengist tsehay lij"


def write_checkpoint(root: Path, codec: Path, *, K: int = 3, seed: int = 0, stop_bias: float = 0.0,
                     cond_feat_dim: int | None = None) -> Path:
    """A tiny (untrained) stage folder as the trainer writes it: weights, model.json naming the text
    settings and the codec, its own bpe.model; codes of the demo DAC (3 codebooks of 16)."""
    import numpy as np

    from indextts.checkpoint import save_checkpoint
    from indextts.files import sha256_file
    from tests.factories import make_bpe

    rng = np.random.default_rng(seed)
    words = WORDS.split()
    bpe = make_bpe(root / f"vocab-{seed}.model", [" ".join(rng.choice(words, 6)) for _ in range(200)], 40)
    import sentencepiece as spm

    n_pieces = spm.SentencePieceProcessor(model_file=str(bpe)).get_piece_size()
    extra = {} if cond_feat_dim is None else {"features": {"n_mels": cond_feat_dim}}
    cfg = model_config("tiny", number_text_tokens=n_pieces, number_mel_codes=18, n_codebooks=K, **extra)
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        model.mel_head.bias[cfg.stop_mel_token] += stop_bias
    return save_checkpoint(
        root / f"stage-{seed}-{K}", model, model_cfg=cfg, vocab_path=bpe, text_cfg={"language": "am"},
        codec_cfg={"weights": str(codec), "kind": "dac"}, stage="stage3", training_type="full",
        parent_sha256=None, data_index_sha256=None, step=1,
        extra={"codes_codec": {"n_q": 3, "codebook_size": 16, "weights_sha256": sha256_file(codec)}})


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The demo codec, a checkpoint folder of it, and prompt clips of different lengths."""
    import warnings

    import numpy as np
    import soundfile as sf

    from indextts.audio.dac import make_demo_codec

    root = tmp_path_factory.mktemp("synth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        codec = make_demo_codec(root / "dac_tiny.pth")
    ckpt = write_checkpoint(root, codec, stop_bias=0.5)
    prompts = []
    for i, seconds in enumerate((1.2, 2.0, 0.8)):
        t = np.arange(int(seconds * 16000)) / 16000
        wave = 0.3 * np.sin(2 * np.pi * (140 + 50 * i) * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
        sf.write(root / f"prompt{i}.wav", wave.astype(np.float32), 16000)
        prompts.append(root / f"prompt{i}.wav")
    return {"root": root, "codec": codec, "ckpt": ckpt, "prompts": prompts}


def run_cli(*args: str) -> int:
    from indextts.cli import main

    return main(["synthesize", *map(str, args)])


FAST = ("--max-frames", "30")


def test_same_seed_same_wav_bytes_and_the_wav_matches_the_frames(assets, tmp_path: Path) -> None:
    import soundfile as sf

    ckpt, (p0, p1, _) = assets["ckpt"], assets["prompts"]
    outs = []
    for i, seed in enumerate((3, 3, 4)):
        out = tmp_path / f"{i}.wav"
        assert run_cli("--checkpoint", ckpt, "--text", "selam dehna new", "--speaker-prompt", p0,
                       "--emotion-prompt", p1, "--emo-alpha", "0.7", "--seed", seed, "--out", out, *FAST) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1] and outs[0] != outs[2]
    info = sf.info(str(tmp_path / "0.wav"))
    assert info.samplerate == 16000 and info.subtype == "PCM_16"
    assert info.frames % 320 == 0 and 1 <= info.frames // 320 <= 30  # whole DAC frames, capped


def request_list(tmp_path: Path, prompts) -> Path:
    import pandas as pd

    rows = [{"name": "long", "text": "selam dehna new alem bet sew wuha", "speaker_prompt": prompts[0].name,
             "emotion_prompt": prompts[1].name, "note": "a"},
            {"name": "short", "text": "lij", "speaker_prompt": prompts[1].name, "emotion_prompt": "", "note": "b"},
            {"name": "mid", "text": "tsehay mengist bet", "speaker_prompt": prompts[2].name, "emotion_prompt": "",
             "note": "c"}]
    for p in prompts:  # relative prompt paths resolve against the list's folder
        shutil.copy(p, tmp_path / p.name)
    path = tmp_path / "list.tsv"
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def test_batch_mode_gives_every_row_what_it_gets_alone(assets, tmp_path: Path) -> None:
    import pandas as pd

    lst = request_list(tmp_path, assets["prompts"])
    for bs in (3, 1):
        assert run_cli("--checkpoint", assets["ckpt"], "--list", lst, "--out-dir", tmp_path / f"bs{bs}",
                       "--batch-size", bs, *FAST) == 0
    a, b = (pd.read_csv(tmp_path / f"bs{bs}/samples.tsv", sep="\t") for bs in (3, 1))
    assert list(a["name"]) == ["long", "short", "mid"]  # input order, whatever the batching
    assert list(a.columns) == ["name", "text", "speaker_prompt", "emotion_prompt", "note", "frames", "seconds",
                               "stop_reached", "rtf"]
    assert a.drop(columns="rtf").equals(b.drop(columns="rtf"))
    for name in a["name"]:
        assert (tmp_path / f"bs3/{name}.wav").read_bytes() == (tmp_path / f"bs1/{name}.wav").read_bytes(), name
    assert len(set(a["frames"])) > 1  # rows of different lengths in one batch
    assert (a["seconds"] == a["frames"] * 320 / 16000).all()


def test_synthesis_needs_nothing_but_the_folder_and_the_codec(assets, tmp_path: Path) -> None:
    """A copied folder whose model.json points at a vocabulary and codec that no longer exist."""
    import json

    from indextts.audio.dac import make_demo_codec

    folder = tmp_path / "moved"
    shutil.copytree(assets["ckpt"], folder)
    meta = json.loads((folder / "model.json").read_text())
    meta["vocab"]["path"] = str(tmp_path / "gone" / "bpe.model")
    meta["codec"]["weights"] = str(tmp_path / "gone" / "dac.pth")
    (folder / "model.json").write_text(json.dumps(meta))
    codec = tmp_path / "dac.pth"
    shutil.copy(assets["codec"], codec)
    out = tmp_path / "x.wav"
    args = ("--checkpoint", folder, "--text", "selam new", "--speaker-prompt", assets["prompts"][0], "--out", out, *FAST)
    assert run_cli(*args, "--codec-weights", codec) == 0 and out.stat().st_size > 44
    assert run_cli(*args) == 1  # the recorded codec is gone: an error that says --codec-weights
    other = make_demo_codec(tmp_path / "other.pth", seed=1)
    assert run_cli(*args, "--codec-weights", other) == 1  # not the codec the codes were made with


def test_errors_name_the_row_and_what_to_do(assets, tmp_path: Path, capsys) -> None:
    import json

    from indextts.synthesize import SynthesisError, Synthesizer, read_requests

    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in (
        {"name": "a", "text": "selam", "speaker_prompt": "missing.wav"},
        {"name": "a", "text": "new", "speaker_prompt": str(assets["prompts"][0])},
        {"name": "../x", "text": "new", "speaker_prompt": str(assets["prompts"][0])})))
    with pytest.raises(SynthesisError) as e:
        read_requests(bad)
    msg = str(e.value)
    assert "row 1 ('a'): speaker_prompt" in msg and "missing.wav does not exist" in msg
    assert "row 2 ('a'): duplicate name" in msg and "row 3 ('../x'): name must be a plain file stem" in msg
    (tmp_path / "nocol.tsv").write_text("name\ttext\na\tb\n")
    with pytest.raises(SynthesisError, match="missing column.*speaker_prompt"):
        read_requests(tmp_path / "nocol.tsv")
    # Semantic codes with log-mel prompts (a model that cannot come from extraction) are refused by
    # name; semantic synthesis itself is tests/test_voice.py's.
    folder = tmp_path / "semantic"
    shutil.copytree(assets["ckpt"], folder)
    meta = json.loads((folder / "model.json").read_text())
    meta["codec"]["kind"] = "semantic"
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(SynthesisError, match="prompts are log_mel features; synthesis computes w2v_bert prompts"):
        Synthesizer(folder)


def test_stop_token_or_maximum_length_with_a_warning(assets, capsys) -> None:
    from indextts.synthesize import Request, Synthesizer, SynthesizeConfig

    synth = Synthesizer(assets["ckpt"], device="cpu")
    reqs = [Request(name="r", text="selam dehna", speaker_prompt=assets["prompts"][0])]
    stop = synth.cfg.stop_mel_token
    for bias, frames, stopped in ((-1e4, 25, False), (1e4, 1, True)):
        with torch.no_grad():
            synth.model.mel_head.bias[stop] = bias
        (s,) = synth.synthesize(reqs, SynthesizeConfig(max_frames=25), log=lambda m: None)
        assert (s.frames, s.stop_reached) == (frames, stopped)
        assert s.codes.shape == (3, frames) and s.audio.shape == (frames * 320,)
        err = capsys.readouterr().err
        assert ("reached the maximum length (25 frames" in err) == (not stopped)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (runs where one is present)")
def test_synthesis_on_cuda_equals_the_cpu_in_length_and_runs(assets, tmp_path: Path) -> None:
    from indextts.synthesize import Request, Synthesizer, SynthesizeConfig

    reqs = [Request(name="r", text="selam dehna", speaker_prompt=assets["prompts"][0])]
    cfg = SynthesizeConfig(max_frames=25, temperature=0)
    cpu = next(Synthesizer(assets["ckpt"], device="cpu").synthesize(reqs, cfg, log=lambda m: None))
    gpu = next(Synthesizer(assets["ckpt"], device="cuda").synthesize(reqs, cfg, log=lambda m: None))
    assert gpu.frames == cpu.frames and torch.equal(gpu.codes, cpu.codes)


# --- the sample set -------------------------------------------------------------------------------


def clean_table(path: Path, per_speaker_val: dict[str, int]) -> Path:
    import pandas as pd

    rows = []
    emotions = ["neutral", "happy", "sad"]
    for spk, n_val in per_speaker_val.items():
        for j in range(n_val + 3):
            rows.append({"utt_id": f"{spk}_{j:02d}", "audio_path": f"/data/{spk}_{j:02d}.wav", "text": f"text {spk} {j}",
                         "speaker": spk, "emotion": emotions[j % 3], "split": "val" if j < n_val else "train"})
    pd.DataFrame(rows).to_parquet(path)
    return path


def test_sample_set_draws_held_out_prompts_and_cross_pairs(tmp_path: Path) -> None:
    from indextts.synthesize import SamplesConfig, SynthesisError, select_samples

    clean = clean_table(tmp_path / "clean.parquet", {"a": 3, "b": 2, "c": 4, "d": 1})
    cfg = SamplesConfig(n_same=4, n_cross=3, seed=1)
    t = select_samples(cfg, clean)
    assert list(t["name"]) == cfg.names() == [f"same-{i:02d}" for i in range(4)] + [f"cross-{i:02d}" for i in range(3)]
    assert set(t["speaker"]) == {"a", "b", "c"}  # d has one val utterance: no held-out prompt for it
    val = {f"/data/{s}_{j:02d}.wav" for s, n in {"a": 3, "b": 2, "c": 4, "d": 1}.items() for j in range(n)}
    for r in t.to_dict("records"):
        assert r["speaker_prompt"] != r["reference"]  # the prompt is another utterance than the text's
        assert {r["speaker_prompt"], r["reference"]} <= val  # both held out
        assert r["speaker_prompt"].startswith(f"/data/{r['speaker']}_") and r["utt_id"].startswith(r["speaker"])
        if r["kind"] == "same":
            assert r["emotion_prompt"] == "" and r["emotion_speaker"] == r["speaker"]
        else:
            assert r["emotion_speaker"] != r["speaker"] and r["emotion_prompt"].startswith(f"/data/{r['emotion_speaker']}_")
    assert t.equals(select_samples(cfg, clean))  # fixed: the same set for every stage and rerun
    assert not t.equals(select_samples(SamplesConfig(n_same=4, n_cross=3, seed=2), clean))
    with pytest.raises(SynthesisError, match="cross samples need two speakers"):
        select_samples(SamplesConfig(n_cross=1), clean_table(tmp_path / "one.parquet", {"a": 3, "d": 1}))
    with pytest.raises(SynthesisError, match="no speaker has two val utterances"):
        select_samples(cfg, clean_table(tmp_path / "none.parquet", {"a": 1}))


def test_base_language_replay_rows_are_never_the_new_language_samples_but_the_base_ones(tmp_path: Path) -> None:
    """data.replay rows (clean.parquet's replay column) are base-language speech: not drawn as
    same, cross or novel samples, nor as their prompts; they are the base samples."""
    import pandas as pd

    from indextts.synthesize import SamplesConfig, SynthesisError, select_samples

    path = clean_table(tmp_path / "clean.parquet", {"a": 3, "b": 3, "en": 6})
    frame = pd.read_parquet(path)
    frame["replay"] = frame["speaker"] == "en"
    frame.to_parquet(path)
    t = select_samples(SamplesConfig(n_same=4, n_cross=2, seed=0), path)
    used = set(t["speaker"]) | set(t["emotion_speaker"])
    assert used <= {"a", "b"} and not t["speaker_prompt"].str.contains("/en_").any(), t
    # samples.n_base: base-language val texts, after the others, each with a held-out prompt of
    # its own (base-language) speaker; the other kinds are drawn exactly as without them
    cfg = SamplesConfig(n_same=4, n_cross=2, n_base=3, seed=0)
    b = select_samples(cfg, path)
    assert list(b["name"]) == cfg.names() and cfg.names()[-3:] == ["base-00", "base-01", "base-02"]
    assert b.iloc[:6].equals(t) and list(b["kind"][6:]) == ["base"] * 3
    for r in b.iloc[6:].to_dict("records"):
        assert r["speaker"] == "en" and r["reference"].startswith("/data/en_") and r["speaker_prompt"].startswith("/data/en_")
        assert r["speaker_prompt"] != r["reference"] and r["emotion_prompt"] == ""
    assert frame.set_index("utt_id").loc[b["utt_id"][6:], "split"].eq("val").all()  # val rows only
    assert len(set(b["utt_id"][6:])) == 3
    # no base-language val speaker: a clear error naming the key
    frame["replay"] = False
    frame.to_parquet(tmp_path / "no_replay.parquet")
    with pytest.raises(SynthesisError, match=r"data.replay.*set samples.n_base: 0"):
        select_samples(cfg, tmp_path / "no_replay.parquet")


def test_novel_samples_read_texts_never_trained_on_and_the_others_known_ones(tmp_path: Path) -> None:
    import pandas as pd

    from indextts.synthesize import SamplesConfig, SynthesisError, select_samples

    # 4 speakers x 6 utterances of texts t0..t5; t4 and t5 are held out whole (all in val), and
    # each speaker has one more val utterance of a text that train also has.
    rows = []
    for spk in "abcd":
        for j in range(6):
            held = j >= 4
            rows.append({"utt_id": f"{spk}_{j}", "audio_path": f"/data/{spk}_{j}.wav", "text": f"t{j}", "speaker": spk,
                         "emotion": "", "split": "val" if held or j == ord(spk) % 4 else "train"})
    pd.DataFrame(rows).to_parquet(tmp_path / "clean.parquet")
    clean = pd.read_parquet(tmp_path / "clean.parquet")
    trained = set(clean.loc[clean["split"] == "train", "text"])
    cfg = SamplesConfig(n_same=3, n_cross=2, n_novel=3, seed=0)
    t = select_samples(cfg, tmp_path / "clean.parquet")
    assert list(t["name"]) == cfg.names() and cfg.names()[-3:] == ["novel-00", "novel-01", "novel-02"]
    assert list(t["kind"]) == ["same"] * 3 + ["cross"] * 2 + ["novel"] * 3
    known = t[t["kind"] != "novel"]
    assert known["text"].isin(trained).all()  # same and cross speak texts the model trained on
    assert not t.loc[t["kind"] == "novel", "text"].isin(trained).any()  # novel ones it never saw
    for r in t[t["kind"] == "novel"].to_dict("records"):
        assert r["speaker_prompt"] != r["reference"] and r["speaker_prompt"].startswith(f"/data/{r['speaker']}_")
        assert r["emotion_prompt"] == ""
    # without novel samples the others may draw any val text (the old set, unchanged)
    plain = select_samples(SamplesConfig(n_same=3, n_cross=2, seed=0), tmp_path / "clean.parquet")
    assert list(plain["kind"]) == ["same"] * 3 + ["cross"] * 2
    # nothing held out: a clear error naming the key to raise
    clean.loc[clean["text"].isin(["t4", "t5"]) & (clean["speaker"] == "a"), "split"] = "train"  # now trained on
    clean.to_parquet(tmp_path / "none.parquet")
    with pytest.raises(SynthesisError, match="raise clean.val_text_fraction or set samples.n_novel: 0"):
        select_samples(cfg, tmp_path / "none.parquet")


# --- export ---------------------------------------------------------------------------------------


def test_one_stream_export_is_the_official_layout_and_reimports_identically(assets, tmp_path: Path) -> None:
    import yaml

    from indextts.model.transfer import load_official_state_dict
    from indextts.pretrained import export_stage

    ckpt = write_checkpoint(tmp_path, assets["codec"], K=1, seed=2)
    released = tmp_path / "released.yaml"
    released.write_text(yaml.safe_dump({
        "dataset": {"bpe_model": "bpe.model", "sample_rate": 24000},
        "gpt": {"model_dim": 1280, "number_text_tokens": 12000, "condition_module": {"num_blocks": 6, "input_layer": "conv2d2"}},
        "s2mel": {"DiT": {"depth": 13}}, "emo_num": [3, 17], "version": 2.0}))
    report = export_stage(ckpt, tmp_path / "export", released_config=released)
    out = tmp_path / "export"
    assert report["files"] == sorted(["bpe.model", "config.yaml", "export_report.json", "gpt.pth", "model.json"])
    assert report["reimport"]["ok"] and report["reimport"]["identical"] and report["reimport"]["differing_tensors"] == []
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    mc = build_model(model_config("tiny", number_text_tokens=cfg["gpt"]["number_text_tokens"], number_mel_codes=18)).cfg
    assert cfg["gpt"]["model_dim"] == mc.model_dim == 32 and cfg["gpt"]["number_mel_codes"] == 18
    assert (cfg["gpt"]["start_mel_token"], cfg["gpt"]["stop_mel_token"]) == (16, 17)
    assert cfg["gpt"]["condition_module"]["num_blocks"] == mc.cond_num_blocks
    assert cfg["s2mel"] == {"DiT": {"depth": 13}} and cfg["emo_num"] == [3, 17]  # the released sections kept
    assert cfg["dataset"]["sample_rate"] == 24000 and cfg["gpt_checkpoint"] == "gpt.pth"
    official = load_official_state_dict(out / "gpt.pth")
    assert any(k.startswith("gpt.h.0.attn.c_attn") for k in official.state)  # the official names
    cap = report["indextts2"]
    assert cap["official_layout"] and not cap["drop_in"]
    assert any("decodes only its MaskGCT semantic codes" in x for x in cap["cannot"])  # DAC codes
    assert any("cond_feat_dim = 1024" in x for x in cap["cannot"])  # log-mel conditioners


def test_multi_codebook_export_is_our_folder_and_says_why(assets, tmp_path: Path) -> None:
    from indextts.checkpoint import load_checkpoint
    from indextts.pretrained import export_stage

    report = export_stage(assets["ckpt"], tmp_path / "export")
    assert report["files"] == sorted(["bpe.model", "export_report.json", "model.json", "model.safetensors"])
    assert "3 codebooks" in report["official_refused"] and not report["indextts2"]["official_layout"]
    assert report["reimport"]["ok"]
    model, _ = load_checkpoint(tmp_path / "export", vocab_path=tmp_path / "export" / "bpe.model")
    assert model.cfg.n_codebooks == 3


def test_export_check_fails_when_the_reimport_differs(assets, tmp_path: Path, monkeypatch) -> None:
    import indextts.pretrained as pretrained
    from indextts.model.transfer import TransferError

    ckpt = write_checkpoint(tmp_path, assets["codec"], K=1, seed=3)
    real = pretrained.import_official

    def lossy(path, model, **kw):
        report = real(path, model, **kw)
        with torch.no_grad():
            model.final_norm.weight.add_(1e-3)  # what a wrong transpose or a dropped key would do
        return report

    monkeypatch.setattr(pretrained, "import_official", lossy)
    with pytest.raises(TransferError, match="does not re-import identically"):
        pretrained.export_stage(ckpt, tmp_path / "export")


# --- beam search ----------------------------------------------------------------------------------


def beam_model(V: int, semantic: bool, *, stop_bias: float, sharpen: float):
    """A tiny one-stream model: DAC-like (V = 18, log-mel prompts) or semantic-like (V = 66,
    w2v-BERT-sized prompts); ``sharpen`` scales the code head so that the search has choices."""
    extra = {"features": {"kind": "w2v_bert", "w2v_bert_dim": 32}} if semantic else {}
    torch.manual_seed(0)
    m = build_model(model_config("tiny", number_mel_codes=V, n_codebooks=1, **extra)).eval()
    with torch.no_grad():
        m.mel_head.weight.mul_(sharpen)
        m.mel_head.bias[m.cfg.stop_mel_token] += stop_bias
    return m


def hf_generate(m, x: dict, **kw) -> torch.Tensor:
    """transformers' own ``generate`` on our model: a minimal GenerationMixin model whose forward
    gives the next-code logits of ``[start, c_0 .. c_{T-1}]`` by our teacher-forced forward (no
    cache), with the start code suppressed and stop as EOS. Returns the codes after start (the
    stop included, stop-padded)."""
    from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput

    class Codes(PreTrainedModel, GenerationMixin):
        config_class = PretrainedConfig

        def __init__(self) -> None:
            super().__init__(PretrainedConfig(vocab_size=m.cfg.number_mel_codes))
            self.voice = m  # (its parameters tell HF the device)

        def forward(self, input_ids, **_):
            n, T = input_ids.shape[0], input_ids.shape[1] - 1
            codes = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)  # a junk frame past the end
            rows = {k: v.expand(n, *v.shape[1:]) for k, v in x.items()}
            out = self.voice(rows["text_ids"], torch.full((n,), x["text_ids"].shape[1]), codes, torch.full((n,), T),
                             rows["cond_feats"], rows["cond_lengths"], rows["emo_feats"], rows["emo_lengths"])
            return CausalLMOutput(logits=out.mel_logits[:, T : T + 1])

        def prepare_inputs_for_generation(self, input_ids, **_):
            return {"input_ids": input_ids}

    start, stop = m.cfg.start_mel_token, m.cfg.stop_mel_token
    out = Codes().eval().generate(torch.tensor([[start]]), suppress_tokens=[start], eos_token_id=stop,
                                  pad_token_id=stop, use_cache=False, **kw)
    return out[0, 1:]


def same_as_hf(m, hf: torch.Tensor, codes: torch.Tensor, n: torch.Tensor, limit: int) -> bool:
    """Our codes ``[1, 1, T]`` / length are HF's sequence: the same codes, then its stop (or the cap)."""
    T = int(n[0])
    return hf[:T].tolist() == codes[0, 0].tolist() and (T == limit or int(hf[T]) == m.cfg.stop_mel_token)


@pytest.mark.parametrize("V, semantic, stop_bias, sharpen", [(18, False, 1.0, 1.0), (66, True, 1.0, 20.0)],
                         ids=["dac-like", "semantic-like"])
def test_beam_search_equals_huggingface(V: int, semantic: bool, stop_bias: float, sharpen: float) -> None:
    """Greedy beam search (num_beams 3, repetition penalty, min_new_tokens, both length penalties)
    gives HF's own beam search token for token; hypotheses finish at different lengths, so the
    length penalty picks different winners, and the search runs past the one it returns."""
    m = beam_model(V, semantic, stop_bias=stop_bias, sharpen=sharpen)
    limit, lengths, ran_on, beats_greedy = 25, {}, False, False
    for r in (0, 1):
        x = row(ragged_inputs(m.cfg), r)
        greedy, _, _ = generate(m, x, temperature=0, max_new_tokens=limit, min_new_tokens=3, repetition_penalty=10.0)
        for lp in (0.0, 1.0):
            kw = dict(num_beams=3, max_new_tokens=limit, min_new_tokens=3, repetition_penalty=10.0, length_penalty=lp)
            codes, n, steps = generate(m, x, temperature=0, **kw)
            assert same_as_hf(m, hf_generate(m, x, do_sample=False, **kw), codes, n, limit), f"row {r} lp {lp}"
            lengths[r, lp] = int(n[0])
            ran_on |= len(steps) > int(n[0]) + 1
            beats_greedy |= not torch.equal(codes, greedy)
    assert any(lengths[r, 0.0] != lengths[r, 1.0] for r in (0, 1)), lengths
    assert ran_on and beats_greedy


def test_beam_sampling_equals_huggingface_under_the_same_seed() -> None:
    """Beam sampling (infer_v2's settings) draws HF's candidates: with the global RNG seeded alike,
    the same codes; its top-k/top-p keep at least 2 ids, as HF's do with beams."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 66, generator=g) * 5
    want = TopPLogitsWarper(0.3, min_tokens_to_keep=2)(None, TopKLogitsWarper(1, min_tokens_to_keep=2)(None, logits))
    assert torch.equal(warp_logits(logits, 1.0, 1, 0.3, min_keep=2), want)
    assert (~torch.isinf(want)).sum(-1).min() == 2
    kw = dict(num_beams=3, max_new_tokens=25, min_new_tokens=3, repetition_penalty=10.0, length_penalty=0.0,
              temperature=0.8, top_k=30, top_p=0.8)
    for V, semantic, stop_bias, sharpen in ((18, False, 2.0, 20.0), (66, True, 1.0, 1.0)):
        m = beam_model(V, semantic, stop_bias=stop_bias, sharpen=sharpen)
        x = row(ragged_inputs(m.cfg), 0)
        for seed in (0, 2):
            torch.manual_seed(seed)
            hf = hf_generate(m, x, do_sample=True, **kw)
            torch.manual_seed(seed)
            codes, n, _ = generate(m, x, **kw)
            assert same_as_hf(m, hf, codes, n, 25), f"V {V} seed {seed}"


def test_beam_sampling_is_seeded_and_every_row_is_what_it_is_alone() -> None:
    m = beam_model(66, False, stop_bias=1.0, sharpen=5.0)
    x = ragged_inputs(m.cfg)
    kw = dict(num_beams=3, temperature=0.8, top_k=30, top_p=0.8, repetition_penalty=10.0, length_penalty=0.0,
              min_new_tokens=2, max_new_tokens=30)

    def gens(rows, base=100):
        return [torch.Generator().manual_seed(base + b) for b in rows]

    runs = [generate(m, row(x, 0), generator=torch.Generator().manual_seed(s), **kw)[:2] for s in (5, 5, 6)]
    assert torch.equal(runs[0][0], runs[1][0]) and not torch.equal(runs[0][0], runs[2][0])
    codes, n, _ = generate(m, x, generator=gens(range(3)), **kw)
    assert len(set(n.tolist())) > 1  # rows end at different frames
    for b in range(3):
        c1, n1, _ = generate(m, row(x, b), generator=gens([b]), **kw)
        assert int(n1[0]) == int(n[b]) and torch.equal(c1[0], codes[b, :, : int(n1[0])])
        assert (codes[b, :, int(n1[0]) :] == m.cfg.stop_mel_token).all()
    # Greedy beams: a ragged batch with the cache, row by row without it.
    greedy = dict(kw, temperature=0.0, length_penalty=1.0)
    codes, n, _ = generate(m, x, **greedy)
    for b in range(3):
        c1, n1, _ = generate(m, row(x, b), use_cache=False, **greedy)
        assert int(n1[0]) == int(n[b]) and torch.equal(c1[0], codes[b, :, : int(n1[0])])
    with pytest.raises(ValueError, match="one code stream"):
        generate(tiny_k(3), row(x, 0), **kw)


def test_num_beams_reach_generation_and_need_one_code_stream(assets, tmp_path: Path, capsys) -> None:
    from indextts.config import ConfigError
    from indextts.synthesize import Request, SynthesisError, Synthesizer, SynthesizeConfig

    with pytest.raises(ConfigError, match="synthesize.num_beams must be at least 1"):
        SynthesizeConfig(num_beams=0)
    reqs = [Request(name="r", text="selam dehna", speaker_prompt=assets["prompts"][0])]
    with pytest.raises(SynthesisError, match="synthesize.num_beams is 3 .* one code stream"):
        next(Synthesizer(assets["ckpt"], device="cpu").synthesize(reqs, SynthesizeConfig(num_beams=3)))
    out = tmp_path / "x.wav"
    args = ("--checkpoint", assets["ckpt"], "--text", "selam", "--speaker-prompt", assets["prompts"][0], "--out", out)
    assert run_cli(*args, "--num-beams", "3", "--length-penalty", "1", *FAST) == 1
    assert "synthesize.num_beams" in capsys.readouterr().err
    # One stream: the beams and the length penalty reach generate_codes.
    synth = Synthesizer(write_checkpoint(tmp_path, assets["codec"], K=1, seed=2, stop_bias=0.5), device="cpu")
    seen, generate_codes = [], synth.model.generate_codes

    def spy(*a, **kw):
        seen.append((kw["num_beams"], kw["length_penalty"]))
        return generate_codes(*a, **kw)

    synth.model.generate_codes = spy
    (s,) = synth.synthesize(reqs, SynthesizeConfig(num_beams=3, length_penalty=1.0, max_frames=20), log=lambda m: None)
    assert seen == [(3, 1.0)] and 1 <= s.frames <= 20 and s.codes.shape[0] == 1
