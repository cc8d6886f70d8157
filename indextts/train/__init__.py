"""``indextts train --stage {1,2,3}``: the three IndexTTS2 training stages, one code path.

Stages (IndexTTS2, arXiv 2506.21619; DESIGN §5):

1. *basic*: from the released ``gpt.pth`` (``pretrained.gpt``, imported with the vocabulary
   transfer) or from scratch; everything trainable.
2. *disentangle*: from stage 1; the speaker conditioner is frozen; ``emo_vec`` (computed in the
   forward pass from the emotion prompt) goes through a gradient reversal layer into a speaker
   classifier over ``speakers.json``; loss = TTS + alpha * speaker CE. Only utterances of mapped
   speakers are used. The classifier is saved beside the stage-2 weights, never exported.
3. *fine-tune*: from stage 2; every conditioner frozen, no classifier; a lower learning rate.

A stage is composed of plain functions (build, freeze, data, optimiser, step, evaluate, save),
configured by :class:`TrainConfig`; there is no trainer class hierarchy. The recipe,
:func:`~indextts.train.recipe.train_stage`, composes them; one module per concern:

- :mod:`.settings`: the ``train`` config section and the errors a stage stops with;
- :mod:`.distributed`: the torchrun process group, the device, collectives;
- :mod:`.preflight`: the inputs checked before any step, the starting model;
- :mod:`.loading`: datasets over the training data cache, samplers (replay mix), loaders;
- :mod:`.trainable`: frozen conditioners, LoRA adapters;
- :mod:`.objective`: the GRL and speaker classifier, the loss, the optimiser's schedule;
- :mod:`.validation`: val losses per language, the forgetting guard;
- :mod:`.state`: resumable states;
- :mod:`.metrics`: metrics.jsonl, TensorBoard, progress, MFU;
- :mod:`.cli`: ``indextts train``.

Restartability: a *state* (model incl. adapters and classifier, optimiser, scheduler, the RNG
state of every rank, step, data position, and a fingerprint of the config and inputs) is saved
atomically every ``state_every`` steps under ``<out_dir>/state/``, which is not a rule output,
so Snakemake never deletes it. A restarted job resumes from the newest state whose fingerprint
matches and replays exactly the batches it had not seen, so a run killed and resumed ends with
the same weights as one that never stopped (CPU, fp32: bit for bit; see the tests). A state
whose fingerprint differs (the user changed the learning rate) is moved aside and training
starts fresh, saying so.

Losses are normalised by non-padding targets over the whole effective batch (every micro-batch
of the gradient accumulation, on every rank), so accumulation and data parallelism change how
a step is computed, not what it computes.
"""

from indextts.train.distributed import Dist, init_distributed, resolve_device
from indextts.train.objective import StageObjective, grl_lambda, lr_lambda, param_groups
from indextts.train.preflight import StageInputs, preflight
from indextts.train.recipe import train_stage
from indextts.train.settings import (
    CLASSIFIER,
    METRICS,
    STAGES,
    STATE_DIR,
    LoraSettings,
    PreflightError,
    Stage2Settings,
    Stage3Settings,
    StageSettings,
    TrainConfig,
    TrainingDiverged,
)
from indextts.train.state import find_resumable, load_state, save_state
from indextts.train.trainable import EMOTION_CONDITIONER, SPEAKER_CONDITIONER, apply_lora, merge_lora, set_stage_trainable
from indextts.train.validation import evaluate, forgetting_breaches

__all__ = [
    "CLASSIFIER", "EMOTION_CONDITIONER", "METRICS", "SPEAKER_CONDITIONER", "STAGES", "STATE_DIR", "Dist",
    "LoraSettings", "PreflightError", "Stage2Settings", "Stage3Settings", "StageInputs", "StageObjective",
    "StageSettings", "TrainConfig", "TrainingDiverged", "apply_lora", "evaluate", "find_resumable",
    "forgetting_breaches", "grl_lambda", "init_distributed", "load_state", "lr_lambda", "merge_lora",
    "param_groups", "preflight", "resolve_device", "save_state", "set_stage_trainable", "train_stage",
]
