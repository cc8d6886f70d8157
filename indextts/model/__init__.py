"""IndexTTS2's UnifiedVoice (GPT-2 trunk + conformer/perceiver conditioners) with the released
parameter names, its config presets, losses and the stage-2 speaker-adversarial pieces."""

from indextts.model.config import PRESETS, ModelConfig, ModelSection, mel_vocab_size, model_config
from indextts.model.gpt2 import CONV1D_WEIGHT_SUFFIXES, is_conv1d_weight
from indextts.model.losses import masked_cross_entropy
from indextts.model.unified_voice import (
    GradientReversal,
    ModelOutput,
    SpeakerClassifier,
    UnifiedVoice,
    build_model,
    set_trainable,
)

__all__ = [
    "CONV1D_WEIGHT_SUFFIXES",
    "GradientReversal",
    "ModelConfig",
    "ModelOutput",
    "ModelSection",
    "PRESETS",
    "SpeakerClassifier",
    "UnifiedVoice",
    "build_model",
    "is_conv1d_weight",
    "masked_cross_entropy",
    "mel_vocab_size",
    "model_config",
    "set_trainable",
]
