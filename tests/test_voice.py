"""The semantic voice: a semantic-code checkpoint speaks through s2mel, CAM++ and BigVGAN
(``indextts synthesize``), seeded, batch-independent, and voices a real recording from its own
codes (the per-stage topline). Tiny random models in the released layouts."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from indextts.model import build_model, model_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = "selam new dehna alem bet sew wuha mengist tsehay lij"


def write_semantic_checkpoint(root: Path, codec: dict, *, seed: int = 0, stop_bias: float = 0.0) -> Path:
    """A tiny (untrained) semantic-code stage folder as the trainer writes it: one stream of the
    tiny semantic codec's codes, w2v-BERT prompt features, its own bpe.model."""
    import sentencepiece as spm

    from indextts.audio.semantic_codec import TINY_CODEC, TINY_W2V_BERT
    from indextts.checkpoint import save_checkpoint
    from indextts.files import sha256_file
    from tests.factories import make_bpe

    rng = np.random.default_rng(seed)
    words = WORDS.split()
    bpe = make_bpe(root / f"vocab-{seed}.model", [" ".join(rng.choice(words, 6)) for _ in range(200)], 40)
    n_pieces = spm.SentencePieceProcessor(model_file=str(bpe)).get_piece_size()
    features = {"kind": "w2v_bert", "w2v_bert_dim": TINY_W2V_BERT["hidden_size"]}
    cfg = model_config("tiny", number_text_tokens=n_pieces, number_mel_codes=TINY_CODEC.codebook_size + 2,
                       n_codebooks=1, features=features)
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        model.mel_head.bias[cfg.stop_mel_token] += stop_bias
    return save_checkpoint(
        root / f"stage-{seed}", model, model_cfg=cfg, vocab_path=bpe, text_cfg={"language": "am"},
        codec_cfg=dict(codec), stage="stage3", training_type="full", parent_sha256=None, data_index_sha256=None,
        step=1, extra={"codes_codec": {"kind": "semantic", "n_q": 1, "codebook_size": TINY_CODEC.codebook_size,
                                       "weights_sha256": sha256_file(codec["weights"])}})


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    import soundfile as sf

    from indextts.audio.semantic_codec import TINY_W2V_BERT, make_tiny_semantic
    from indextts.voice import make_tiny_voice

    root = tmp_path_factory.mktemp("voice")
    codec = make_tiny_semantic(root / "codec")
    voice = make_tiny_voice(root / "voice", gpt_dim=model_config("tiny").model_dim,
                            semantic_dim=TINY_W2V_BERT["hidden_size"])
    ckpt = write_semantic_checkpoint(root, codec, stop_bias=0.0)
    prompts = []
    for i, (seconds, rate) in enumerate(((1.2, 22050), (2.0, 16000), (0.9, 24000))):
        t = np.arange(int(seconds * rate)) / rate
        wave = 0.3 * np.sin(2 * np.pi * (140 + 50 * i) * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))
        sf.write(root / f"prompt{i}.wav", wave.astype(np.float32), rate)
        prompts.append(root / f"prompt{i}.wav")
    return {"root": root, "codec": codec, "voice": voice, "ckpt": ckpt, "prompts": prompts}


def run_cli(*args) -> int:
    from indextts.cli import main

    return main(["synthesize", *map(str, args)])


def voice_args(assets) -> list[str]:
    v = assets["voice"]
    return ["--s2mel", v["s2mel"], "--campplus", v["campplus"], "--bigvgan", v["bigvgan"]]


FAST = ("--max-frames", "20", "--diffusion-steps", "3")


def request_list(tmp_path: Path, prompts, references=None) -> Path:
    import pandas as pd

    rows = [{"name": "long", "text": "selam dehna new alem bet sew wuha", "speaker_prompt": str(prompts[0]),
             "emotion_prompt": str(prompts[1])},
            {"name": "short", "text": "lij", "speaker_prompt": str(prompts[1]), "emotion_prompt": ""},
            {"name": "mid", "text": "tsehay mengist bet", "speaker_prompt": str(prompts[2]), "emotion_prompt": ""}]
    if references:
        for r, ref in zip(rows, references):
            r["reference"] = str(ref)
    path = tmp_path / "list.tsv"
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)
    return path


def test_code_latents_are_the_states_that_predict_each_code(assets) -> None:
    """The second pass's latents: code_logits of them equal the teacher-forced logits of c_0..c_{T-1}."""
    torch.manual_seed(0)
    cfg = model_config("tiny", n_codebooks=1)
    m = build_model(cfg).eval()
    g = torch.Generator().manual_seed(1)
    text = torch.randint(2, cfg.text_vocab_size, (1, 6), generator=g)
    codes = torch.randint(0, cfg.number_mel_codes - 2, (1, 9), generator=g)
    cond = torch.randn(1, 30, cfg.cond_feat_dim, generator=g)
    lat = m.code_latents(text, codes, cond, torch.tensor([30]))
    assert lat.shape == (9, cfg.model_dim)
    out = m(text, torch.tensor([6]), codes, torch.tensor([9]), cond, torch.tensor([30]))
    logits = m.code_logits(lat[None])[0, :, 0]  # (T, V)
    assert (logits - out.mel_logits[0, :9]).abs().max().item() < 1e-5
    with pytest.raises(ValueError, match="one row of one code stream"):
        build_model(model_config("tiny", n_codebooks=2)).code_latents(text, codes, cond, torch.tensor([30]))


def test_semantic_checkpoint_speaks_seeded_at_22khz_with_the_regulated_length(assets, tmp_path: Path) -> None:
    import pandas as pd
    import soundfile as sf

    lst = request_list(tmp_path, assets["prompts"])
    outs = {}
    for tag, seed, bs in (("a", 3, 3), ("b", 3, 1), ("c", 4, 3)):
        assert run_cli("--checkpoint", assets["ckpt"], *voice_args(assets), "--list", lst, "--out-dir",
                       tmp_path / tag, "--seed", seed, "--batch-size", bs, *FAST) == 0
        outs[tag] = {n: (tmp_path / tag / f"{n}.wav").read_bytes() for n in ("long", "short", "mid")}
    assert outs["a"] == outs["b"]  # same seed, same bytes, whatever the batch
    assert outs["a"] != outs["c"]
    table = pd.read_csv(tmp_path / "a" / "samples.tsv", sep="\t")
    assert len(set(table["frames"])) > 1 and table["frames"].max() > 3, table  # rows of different lengths
    for r in table.to_dict("records"):
        info = sf.info(str(tmp_path / "a" / f"{r['name']}.wav"))
        assert info.samplerate == 22050 and info.subtype == "PCM_16"
        # floor(1.72 x codes) mel frames of 256 samples each (infer_v2's target length)
        assert info.frames == math.floor(172 * int(r["frames"]) / 100) * 256, r
        assert r["seconds"] == pytest.approx(info.frames / 22050, abs=1e-4)


def test_topline_voices_the_real_recording_from_its_own_codes(assets, tmp_path: Path) -> None:
    import soundfile as sf

    from indextts.audio.w2v_bert import w2v_bert_frames
    from indextts.codes import read_audio

    refs = assets["prompts"][::-1]
    lst = request_list(tmp_path, assets["prompts"], references=refs)
    for tag in ("a", "b"):
        assert run_cli("--checkpoint", assets["ckpt"], *voice_args(assets), "--list", lst, "--out-dir",
                       tmp_path / tag, "--topline-dir", tmp_path / tag / "topline", *FAST) == 0
    for name, ref in zip(("long", "short", "mid"), refs):
        wav = tmp_path / "a" / "topline" / f"{name}.wav"
        assert wav.read_bytes() == (tmp_path / "b" / "topline" / f"{name}.wav").read_bytes()
        n_codes = w2v_bert_frames(read_audio(str(ref), 16000).shape[0])
        assert sf.info(str(wav)).frames == math.floor(172 * n_codes / 100) * 256


def test_a_semantic_checkpoint_without_its_voice_files_says_which_keys(assets, tmp_path: Path, capsys) -> None:
    p = assets["prompts"][0]
    assert run_cli("--checkpoint", assets["ckpt"], "--text", "selam", "--speaker-prompt", p, "--out",
                   tmp_path / "x.wav", *FAST) == 1
    err = capsys.readouterr().err
    assert "pretrained.s2mel" in err and "pretrained.campplus" in err and "pretrained.bigvgan" in err
    v = assets["voice"]
    assert run_cli("--checkpoint", assets["ckpt"], "--s2mel", tmp_path / "none.pth", "--campplus", v["campplus"],
                   "--bigvgan", v["bigvgan"], "--text", "selam", "--speaker-prompt", p, "--out", tmp_path / "x.wav") == 1
    assert "none.pth" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.integration
def test_semantic_dag_speaks_every_stage_scores_it_and_a_second_run_does_nothing(tmp_path: Path) -> None:
    """codec.kind semantic with tiny random w2v-BERT, semantic codec, s2mel, CAM++ and BigVGAN in the
    released layouts, through the real snakemake: extraction, three stages, samples per stage with
    their own toplines, evaluation, export and report; then nothing left to do."""
    import copy
    import json
    import shutil

    import soundfile as sf
    import yaml

    from indextts.audio.semantic_codec import TINY_W2V_BERT, make_tiny_semantic
    from indextts.voice import make_tiny_voice
    from tests.workflow_util import SMALL_DEMO, copy_workflow, deep_update, edit_config, planned_jobs, snakemake

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (make install puts it there)")
    (tmp_path / "wf").mkdir()
    wd = copy_workflow(tmp_path / "wf")
    codec = make_tiny_semantic(tmp_path / "models" / "codec")
    voice = make_tiny_voice(tmp_path / "models" / "voice", gpt_dim=model_config("tiny").model_dim,
                            semantic_dim=TINY_W2V_BERT["hidden_size"])

    def semantic(cfg):
        deep_update(cfg, copy.deepcopy(SMALL_DEMO))
        cfg["codec"] = codec
        cfg["features"] = {"store": True, "max_ref_seconds": 6.0}
        cfg["model"]["overrides"] = {"features": {"kind": "w2v_bert", "w2v_bert_dim": TINY_W2V_BERT["hidden_size"]}}
        cfg["pretrained"].update(voice)
        cfg["samples"]["stages"] = [1, 2, 3]
        cfg["synthesize"].update(max_frames=40, diffusion_steps=4)

    edit_config(wd, semantic)
    snakemake(wd, "--cores", "2")
    cfg = yaml.safe_load((wd / "config.yaml").read_text())
    names = ["same-00", "cross-00"]
    for stage in (1, 2, 3):
        folder = wd / "results" / "samples" / f"stage{stage}"
        for name in names:
            for wav in (folder / f"{name}.wav", folder / "topline" / f"{name}.wav"):
                info = sf.info(str(wav))
                assert info.samplerate == 22050 and info.frames > 0, wav
        summary = json.loads((wd / "results" / "eval" / f"stage{stage}" / "summary.json").read_text())
        assert summary["n"] == len(names) and summary["measures"]["mcd"]["n"] == len(names)
        assert summary["topline"]["mcd"]["n"] == len(names)  # the stage's own topline, scored beside it
        assert "floor" in summary
    ref = json.loads((wd / "results" / "eval" / "reference" / "summary.json").read_text())
    assert "topline" not in ref["systems"] and "floor" in ref["systems"]
    assert (wd / "results" / "export" / "gpt.pth").is_file()
    assert cfg["codec"]["kind"] == "semantic"
    assert planned_jobs(wd, "--cores", "2") == {}
    # Each stage folder records the voice files for a later indextts synthesize ...
    for stage in (1, 2, 3):
        meta = json.loads((wd / "results" / "train" / f"stage{stage}" / "model.json").read_text())
        assert meta["extra"]["voice"] == voice
    # ... and another s2mel re-speaks and rescores the samples, never retrains.
    other = tmp_path / "models" / "voice" / "s2mel-copy.pth"
    shutil.copyfile(voice["s2mel"], other)
    edit_config(wd, lambda c: c["pretrained"].update(s2mel=str(other)))
    plan = planned_jobs(wd, "--cores", "2")
    assert plan.get("synthesize_samples") == 3 and plan.get("evaluate_stage") == 3, plan
    assert not any(rule.startswith(("train_", "extract_", "validate", "export")) for rule in plan), plan
