"""What a stage trains: the frozen conditioners of stages 2 and 3, and LoRA adapters (peft) for
``training_type: lora``."""

from __future__ import annotations

import fnmatch
import re

from torch import nn

from indextts.config import ConfigError
from indextts.train.settings import LoraSettings, StageSettings

# Parameter groups by module prefix (the released names).
SPEAKER_CONDITIONER = ("conditioning_encoder.*", "perceiver_encoder.*")
EMOTION_CONDITIONER = ("emo_conditioning_encoder.*", "emo_perceiver_encoder.*", "emo_layer.*", "emovec_layer.*")


def frozen_patterns(stage: int) -> tuple[str, ...]:
    """Parameter globs a stage freezes: stage 2 the speaker conditioner, stage 3 both conditioners."""
    return {1: (), 2: SPEAKER_CONDITIONER, 3: SPEAKER_CONDITIONER + EMOTION_CONDITIONER}[stage]


def _match(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def apply_lora(model: nn.Module, lora: LoraSettings) -> nn.Module:
    """Inject peft LoRA adapters into the modules matching ``lora.targets`` (in place)."""
    from peft import LoraConfig, inject_adapter_in_model

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _match(n, lora.targets)]
    if not names:
        raise ConfigError(f"train.stageN.lora.targets: {list(lora.targets)} match no linear layer of the model")
    pattern = "^(" + "|".join(map(re.escape, names)) + ")$"
    cfg = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=pattern,
                     init_lora_weights=True)
    return inject_adapter_in_model(cfg, model)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer and put the base layer back, so the state
    dict has the plain model's names (in place)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model


def set_stage_trainable(model: nn.Module, stage: int, settings: StageSettings) -> dict[str, int]:
    """``requires_grad`` for a stage: everything but the stage's frozen conditioners (full), or
    the adapters plus ``lora.fully_trainable`` (lora). Returns parameter counts: ``trainable``
    (adapters included), ``total`` (the model without adapters) and ``adapter``.

    Raises:
        ConfigError: a ``fully_trainable`` glob matches no parameter.
    """
    frozen = frozen_patterns(stage)
    lora = settings.training_type == "lora"
    names = [n for n, _ in model.named_parameters()]
    if lora:
        unmatched = [g for g in settings.lora.fully_trainable if not any(fnmatch.fnmatchcase(n, g) for n in names)]
        if unmatched:
            raise ConfigError(f"train.stage{stage}.lora.fully_trainable: {unmatched} match no parameter")
    trainable = total = 0
    for name, p in model.named_parameters():
        plain = name.replace(".base_layer.", ".")
        if _match(plain, frozen):
            on = False
        elif lora:
            on = "lora_" in name or _match(plain, settings.lora.fully_trainable)
        else:
            on = True
        p.requires_grad_(on)
        total += p.numel() if "lora_" not in name else 0
        trainable += p.numel() if on else 0
    return {"trainable": trainable, "total": total, "adapter": sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)}

