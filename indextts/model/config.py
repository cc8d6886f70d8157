"""Model settings: one frozen dataclass, named presets, and the ``model`` config section.

Field names follow the released IndexTTS2 ``config.yaml`` (``gpt:`` section; the conformer
fields are its ``condition_module`` / ``emo_condition_module`` keys with a ``cond_`` / ``emo_``
prefix), so a released config maps onto :class:`ModelConfig` one key at a time.

The text vocabulary size comes from the trained ``bpe.model`` and the mel vocabulary from the
codec's codebook size (``codebook_size + 2`` for start/stop, see :func:`mel_vocab_size`) when a
model is built, never from the config file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from indextts.config import ConfigError, parse_section, section_dict
from indextts.features import FeatureConfig


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build a :class:`~indextts.model.UnifiedVoice`.

    The defaults are the released IndexTTS2 ``gpt.pth`` (the ``indextts2`` preset). Build one
    with :func:`model_config`, which applies a preset and checks overrides.
    """

    # Name of the preset this config started from; recorded in checkpoints.
    preset: str = "indextts2"

    # --- GPT-2 trunk -------------------------------------------------------------------------
    # 1280 wide, 24 layers, 20 heads of 64: the released model.
    model_dim: int = 1280
    layers: int = 24
    heads: int = 20
    # Longest text (BPE tokens) / code sequence the learned position tables cover; the tables
    # have max_text_tokens + 2 and max_mel_tokens + 3 rows (start, stop, one conditioning slot).
    max_text_tokens: int = 600
    max_mel_tokens: int = 1815
    # The original sizes the mel position table with this (+1 row); kept for shape parity.
    max_conditioning_inputs: int = 1
    # HF GPT2Config's resid/embd/attn dropout default, which the original trained with.
    dropout: float = 0.1

    # --- vocabularies ------------------------------------------------------------------------
    # SentencePiece pieces; text_embedding/text_head get number_text_tokens + 1 rows, the
    # original's ``types=1`` layout (one spare row).
    number_text_tokens: int = 12000
    # Codec codebook size + 2: the two extra ids are start_mel_token and stop_mel_token.
    number_mel_codes: int = 8194
    # IndexTTS's SentencePiece ids: <s> = 0 starts, </s> = 1 stops (and pads) the text.
    start_text_token: int = 0
    stop_text_token: int = 1
    # The two ids after the codebook.
    start_mel_token: int = 8192
    stop_mel_token: int = 8193
    # Residual codebooks predicted per frame, in the delay pattern (indextts.model.delay). 1 is
    # IndexTTS2's single code stream and keeps the released layout exactly; a DAC model needs all
    # of its codebooks to carry speech. Codebook 0 uses mel_embedding / mel_head, codebook k
    # extra_mel_embedding.cb{k} / extra_mel_head.cb{k}, all over the same mel vocabulary.
    n_codebooks: int = 1

    # --- speaker conditioner: conformer (2x subsampling) + perceiver -------------------------
    # Conformer input size = feature size: 1024 for the released w2v-BERT input.
    cond_feat_dim: int = 1024
    # Perceiver latents: the speaker prefix is this many GPT positions long.
    condition_num_latent: int = 32
    cond_output_size: int = 512
    cond_linear_units: int = 2048
    cond_attention_heads: int = 8
    cond_num_blocks: int = 6
    # Perceiver feed-forward multiplier (GEGLU inner size = int(dim * mult * 2 / 3)).
    cond_perceiver_mult: int = 2

    # --- emotion conditioner: conformer + perceiver with one latent -> emo_vec ----------------
    emo_output_size: int = 512
    emo_linear_units: int = 1024
    emo_attention_heads: int = 4
    emo_num_blocks: int = 4
    emo_perceiver_mult: int = 2
    # Width of the emotion perceiver (hard-coded 1024 in the original); emovec_layer maps it
    # to model_dim.
    emo_perceiver_dim: int = 1024

    # --- shared conditioner details ----------------------------------------------------------
    # Depthwise conv kernel of each conformer block (the original's default).
    conv_kernel_size: int = 15
    # Rows of the conformers' sinusoidal ``pe`` buffer: the longest subsampled input + 1.
    pos_enc_max_len: int = 5000
    # Perceiver depth and head width (lucidrains' defaults, used by the original).
    perceiver_depth: int = 2
    perceiver_dim_head: int = 64

    # --- conditioning features ---------------------------------------------------------------
    # The released model reads w2v-BERT features (computed outside); the small presets read
    # log-mel. cond_feat_dim must equal features.dim.
    features: FeatureConfig = field(default_factory=lambda: FeatureConfig(kind="w2v_bert"))

    # --- loss ---------------------------------------------------------------------------------
    # Text prediction is an auxiliary task: 0.1 * text + 1.0 * mel (IndexTTS's weighting).
    text_loss_weight: float = 0.1
    mel_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        p = []
        for name in ("model_dim", "layers", "heads", "max_text_tokens", "max_mel_tokens", "cond_feat_dim",
                     "condition_num_latent", "cond_output_size", "cond_linear_units", "cond_attention_heads",
                     "cond_num_blocks", "emo_output_size", "emo_linear_units", "emo_attention_heads",
                     "emo_num_blocks", "emo_perceiver_dim", "perceiver_depth", "perceiver_dim_head",
                     "pos_enc_max_len", "cond_perceiver_mult", "emo_perceiver_mult", "n_codebooks"):
            if getattr(self, name) <= 0:
                p.append(f"{name} must be positive, got {getattr(self, name)}")
        for dim, heads in (("model_dim", "heads"), ("cond_output_size", "cond_attention_heads"),
                           ("emo_output_size", "emo_attention_heads")):
            if getattr(self, heads) > 0 and getattr(self, dim) % getattr(self, heads):
                p.append(f"{dim} ({getattr(self, dim)}) must be divisible by {heads} ({getattr(self, heads)})")
        if self.conv_kernel_size % 2 == 0:
            p.append(f"conv_kernel_size must be odd, got {self.conv_kernel_size}")
        if not 0.0 <= self.dropout < 1.0:
            p.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.cond_feat_dim < 3:
            p.append(f"cond_feat_dim must be at least 3 (2x conv subsampling), got {self.cond_feat_dim}")
        if self.cond_feat_dim != self.features.dim:
            p.append(f"cond_feat_dim ({self.cond_feat_dim}) must equal the feature size "
                     f"({self.features.kind} gives {self.features.dim}); leave cond_feat_dim unset to follow it")
        for tok in ("start_text_token", "stop_text_token"):
            if not 0 <= getattr(self, tok) < self.text_vocab_size:
                p.append(f"{tok} ({getattr(self, tok)}) is outside the text vocabulary [0, {self.text_vocab_size})")
        for tok in ("start_mel_token", "stop_mel_token"):
            if not 0 <= getattr(self, tok) < self.number_mel_codes:
                p.append(f"{tok} ({getattr(self, tok)}) is outside the mel vocabulary [0, {self.number_mel_codes})")
        if self.start_text_token == self.stop_text_token:
            p.append("start_text_token and stop_text_token must differ")
        if self.start_mel_token == self.stop_mel_token:
            p.append("start_mel_token and stop_mel_token must differ")
        if self.text_loss_weight < 0 or self.mel_loss_weight < 0:
            p.append("loss weights must not be negative")
        if self.n_codebooks > 0 and self.max_code_frames < 1:
            p.append(f"max_mel_tokens ({self.max_mel_tokens}) leaves no frame for {self.n_codebooks} delayed codebooks")
        if p:
            raise ConfigError(f"model config (preset {self.preset!r}):\n  " + "\n  ".join(p))

    # Derived sizes, in one place so the model, FLOP counts and tests agree.
    @property
    def text_vocab_size(self) -> int:
        """Rows of text_embedding and text_head (number_text_tokens + 1)."""
        return self.number_text_tokens + 1

    @property
    def emo_dim(self) -> int:
        """Width of ``emo_vec`` (the output of ``emo_layer``): model_dim."""
        return self.model_dim

    @property
    def text_positions(self) -> int:
        """Rows of text_pos_embedding: text plus start and stop."""
        return self.max_text_tokens + 2

    @property
    def mel_positions(self) -> int:
        """Rows of mel_pos_embedding (the original's max_mel_tokens + 2 + max_conditioning_inputs)."""
        return self.max_mel_tokens + 2 + self.max_conditioning_inputs

    @property
    def max_code_frames(self) -> int:
        """Longest utterance in code frames: the delay pattern spends ``n_codebooks - 1`` of the
        ``max_mel_tokens`` steps on the shift (``max_mel_tokens`` itself when K = 1)."""
        return self.max_mel_tokens - (self.n_codebooks - 1)

    @property
    def prefix_len(self) -> int:
        """GPT positions before the text: the speaker latents and two duration slots."""
        return self.condition_num_latent + 2

    def seq_len(self, text_len: int, mel_len: int) -> int:
        """GPT sequence length for ``text_len`` text tokens and ``mel_len`` code frames (which take
        ``mel_len + n_codebooks - 1`` steps in the delay pattern, plus start and stop)."""
        return self.prefix_len + text_len + 2 + mel_len + self.n_codebooks - 1 + 2


def mel_vocab_size(codebook_size: int) -> int:
    """``number_mel_codes`` for a codec codebook: the codes plus start and stop."""
    return codebook_size + 2


_SMALL_FEATURES = {"kind": "log_mel", "n_mels": 80}

PRESETS: dict[str, dict[str, Any]] = {
    # Exactly the released gpt.pth shapes (w2v-BERT features in).
    "indextts2": {
        "model_dim": 1280, "layers": 24, "heads": 20, "max_text_tokens": 600, "max_mel_tokens": 1815,
        "number_text_tokens": 12000, "number_mel_codes": 8194, "start_mel_token": 8192, "stop_mel_token": 8193,
        "cond_feat_dim": 1024, "features": {"kind": "w2v_bert"},
        "condition_num_latent": 32, "cond_output_size": 512, "cond_linear_units": 2048,
        "cond_attention_heads": 8, "cond_num_blocks": 6, "cond_perceiver_mult": 2,
        "emo_output_size": 512, "emo_linear_units": 1024, "emo_attention_heads": 4, "emo_num_blocks": 4,
        "emo_perceiver_mult": 2, "emo_perceiver_dim": 1024, "dropout": 0.1,
    },
    # A CPU benchmark size: 800 code frames = 16 s at 50 frames/s.
    "small": {
        "model_dim": 256, "layers": 4, "heads": 4, "max_text_tokens": 200, "max_mel_tokens": 800,
        "number_text_tokens": 2000, "number_mel_codes": 1026, "start_mel_token": 1024, "stop_mel_token": 1025,
        "cond_feat_dim": 80, "features": dict(_SMALL_FEATURES),
        "condition_num_latent": 32, "cond_output_size": 128, "cond_linear_units": 256,
        "cond_attention_heads": 2, "cond_num_blocks": 2, "cond_perceiver_mult": 2,
        "emo_output_size": 128, "emo_linear_units": 256, "emo_attention_heads": 2, "emo_num_blocks": 1,
        "emo_perceiver_mult": 2, "emo_perceiver_dim": 128, "perceiver_dim_head": 32, "pos_enc_max_len": 2000,
        "dropout": 0.1,
    },
    # Tests and the demo: builds and runs forward+backward in well under a second on a CPU.
    # 400 code frames = 8 s at the demo codec's 50 frames/s (demo clips are 1-6 s).
    # No dropout, so a tiny batch overfits deterministically.
    "tiny": {
        "model_dim": 32, "layers": 2, "heads": 2, "max_text_tokens": 128, "max_mel_tokens": 400,
        "number_text_tokens": 256, "number_mel_codes": 66, "start_mel_token": 64, "stop_mel_token": 65,
        "cond_feat_dim": 32, "features": {"kind": "log_mel", "n_mels": 32},
        "condition_num_latent": 4, "cond_output_size": 32, "cond_linear_units": 64,
        "cond_attention_heads": 2, "cond_num_blocks": 1, "cond_perceiver_mult": 2,
        "emo_output_size": 32, "emo_linear_units": 64, "emo_attention_heads": 2, "emo_num_blocks": 1,
        "emo_perceiver_mult": 2, "emo_perceiver_dim": 32, "perceiver_dim_head": 16, "pos_enc_max_len": 1000,
        "dropout": 0.0,
    },
}


_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


def model_config(
    preset: str,
    *,
    number_text_tokens: int | None = None,
    number_mel_codes: int | None = None,
    **overrides: Any,
) -> ModelConfig:
    """Build a :class:`ModelConfig` from a named preset plus overrides.

    Args:
        preset: a key of :data:`PRESETS` (``indextts2``, ``small``, ``tiny``).
        number_text_tokens: SentencePiece vocabulary size (``sp.get_piece_size()``).
        number_mel_codes: the full mel vocabulary, ``mel_vocab_size(codebook_size)``. Unless
            overridden too, ``start_mel_token`` / ``stop_mel_token`` become its last two ids.
        **overrides: any :class:`ModelConfig` field. ``features`` may be a
            :class:`FeatureConfig` or a partial mapping merged onto the preset's; when it is given
            and ``cond_feat_dim`` is not, the conformer input size follows the new features.

    Returns:
        The checked, frozen config.

    Raises:
        ConfigError: unknown preset, unknown field, wrong type or inconsistent values; the
            message names each offending field.
    """
    if preset not in PRESETS:
        raise ConfigError(f"model.preset: unknown preset {preset!r} (known: {', '.join(sorted(PRESETS))})")
    unknown = sorted(set(overrides) - _FIELDS)
    if "preset" in overrides:
        unknown.append("preset")
    if unknown:
        raise ConfigError(
            f"model (preset {preset!r}): unknown field(s) {', '.join(unknown)}; "
            f"known fields: {', '.join(sorted(_FIELDS - {'preset'}))}"
        )
    merged: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in PRESETS[preset].items()}
    merged["preset"] = preset
    if number_text_tokens is not None:
        merged["number_text_tokens"] = number_text_tokens
    if number_mel_codes is not None:
        merged["number_mel_codes"] = number_mel_codes
        if isinstance(number_mel_codes, int):
            merged["start_mel_token"] = number_mel_codes - 2
            merged["stop_mel_token"] = number_mel_codes - 1
    for key, value in overrides.items():
        if key == "features":
            if isinstance(value, FeatureConfig):
                value = section_dict(value)
            if not isinstance(value, Mapping):
                raise ConfigError(f"model.features: expected a mapping, got {value!r}")
            # Partial settings refine the preset's features; a new kind starts from its defaults.
            preset_features = merged["features"]
            same_kind = value.get("kind", preset_features.get("kind")) == preset_features.get("kind")
            value = {**preset_features, **value} if same_kind else dict(value)
        merged[key] = value
    if "features" in overrides and "cond_feat_dim" not in overrides:
        feats = parse_section(FeatureConfig, merged["features"], "model.features")
        merged["cond_feat_dim"] = feats.dim
    return parse_section(ModelConfig, merged, "model")


# --- the ``model`` section of the pipeline config ------------------------------------------------

# Fields that the section sets itself or that come from the data, never from overrides.
_NOT_OVERRIDABLE = {
    "preset": "set model.preset",
    "text_loss_weight": "set model.text_loss_weight",
    "mel_loss_weight": "set model.mel_loss_weight",
    "number_text_tokens": "it comes from the trained bpe.model",
    "number_mel_codes": "it comes from the codec's codebook size",
    "n_codebooks": "set model.n_codebooks",
}


@dataclass(frozen=True)
class ModelSection:
    """The ``model`` section of ``config.yaml``: which preset, what to change, loss weights."""

    # tiny runs the embedded demo on a CPU; indextts2 is the released model.
    preset: str = "tiny"
    # ModelConfig fields to change from the preset, e.g. {dropout: 0.0, features: {n_mels: 100}}
    # (parsed from a config file into sorted (key, value) pairs; both forms are accepted).
    overrides: dict[str, Any] = field(default_factory=dict)
    # IndexTTS's weighting: text prediction is auxiliary.
    text_loss_weight: float = 0.1
    mel_loss_weight: float = 1.0
    # Codebooks the model predicts (delay pattern); null takes every codebook the codes hold.
    n_codebooks: int | None = None

    def model_config(self, *, number_text_tokens: int, number_mel_codes: int,
                     codes_n_q: int | None = None) -> ModelConfig:
        """The :class:`ModelConfig` this section describes for the given vocabularies.

        Args:
            number_text_tokens: SentencePiece vocabulary size.
            number_mel_codes: ``mel_vocab_size(codec codebook size)``.
            codes_n_q: codebooks the codes hold (``indextts.codes.codes_n_q(index)``); what
                ``n_codebooks: null`` resolves to. Unknown (None) with ``n_codebooks: null``
                means one codebook.

        Raises:
            ConfigError: naming ``model.preset``, ``model.overrides.<field>`` or
                ``model.n_codebooks`` (more codebooks than the codes hold).
        """
        overrides = dict(self.overrides)
        bad = [f"model.overrides.{k}: not allowed here ({_NOT_OVERRIDABLE[k]})" for k in overrides if k in _NOT_OVERRIDABLE]
        if bad:
            raise ConfigError("invalid config:\n  " + "\n  ".join(bad))
        n_codebooks = self.n_codebooks if self.n_codebooks is not None else (codes_n_q or 1)
        if n_codebooks < 1:
            raise ConfigError(f"model.n_codebooks: must be at least 1 (or null for all), got {n_codebooks}")
        if codes_n_q is not None and n_codebooks > codes_n_q:
            raise ConfigError(
                f"model.n_codebooks: {n_codebooks} asked for, but the codes hold {codes_n_q} codebooks; "
                f"set it to at most {codes_n_q} (null takes all), or re-extract the codes with more "
                "quantizers (codec.n_quantizers)"
            )
        try:
            return model_config(
                self.preset,
                number_text_tokens=number_text_tokens,
                number_mel_codes=number_mel_codes,
                text_loss_weight=self.text_loss_weight,
                mel_loss_weight=self.mel_loss_weight,
                n_codebooks=n_codebooks,
                **overrides,
            )
        except ConfigError as e:
            raise ConfigError(f"model.overrides / model.preset: {e}") from e
