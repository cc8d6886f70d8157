"""Checkpoint folders: ``model.safetensors`` (weights) + ``model.json`` (everything to load it alone).

``model.json`` carries the model config, the vocabulary (path, sha256, byte size, piece count;
the folder holds its own copy, ``bpe.model``, so a folder alone can be tokenised for),
the text normaliser and codec config, the stage and training type, the parent checkpoint's and
the data index's sha256, the step, and the package versions. It is written *after* the weights
and records their byte size and sha256, so it acts as the commit marker: a folder whose weights
do not match its ``model.json`` (a crash between the two writes, a truncated copy) is refused.

Loading checks the vocabulary: the token ids a model was trained with are only meaningful with
that exact ``bpe.model``, so a different file (by sha256) is refused with a message naming both.

Tied tensors: safetensors refuses tensors that share storage. Aliases (one tensor under two names)
are stored once and listed in ``model.json`` under ``aliases``; loading restores them.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from indextts.config import ConfigError, parse_section, section_dict
from indextts.files import atomic_path, sha256_file, write_json

WEIGHTS = "model.safetensors"
META = "model.json"
# The folder's own copy of the vocabulary it was trained with: synthesis and export need nothing
# but the folder (and the codec weights).
VOCAB = "bpe.model"
FORMAT = "indextts-checkpoint"
FORMAT_VERSION = 1

# distribution name -> key in model.json "versions"
_PACKAGES = {
    "torch": "torch",
    "torchaudio": "torchaudio",
    "descript-audio-codec": "dac",
    "sentencepiece": "sentencepiece",
    "safetensors": "safetensors",
    "indextts-adapt": "indextts",
}


class CheckpointError(ValueError):
    """A checkpoint folder cannot be used; the message names the file and what to do."""


class VocabMismatchError(CheckpointError):
    """The ``bpe.model`` given is not the one the checkpoint was trained with."""


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour a checkpoint depends on."""
    out = {"python": platform.python_version()}
    for dist, key in _PACKAGES.items():
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = "not installed"
    if out["indextts"] == "not installed":
        from indextts import __version__

        out["indextts"] = __version__
    return out


def vocab_info(vocab_path: str | Path) -> dict[str, Any]:
    """Path, sha256, byte size and piece count of a SentencePiece model."""
    import sentencepiece as spm

    path = Path(vocab_path)
    if not path.is_file():
        raise CheckpointError(f"{path}: vocabulary file not found")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a SentencePiece model ({e})") from e
    return {
        "path": str(path.resolve()),
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "n_pieces": sp.get_piece_size(),
    }


def section_record(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    """Config section ``name`` as stored in ``model.json``: parsed (so defaults are filled in and
    a bad value fails now, not at inference) and turned back into plain JSON; ``{}`` if absent."""
    from indextts.config import get_section, section_class

    raw = config.get(name)
    if not raw:
        return {}
    parsed = get_section(section_class(name), config, name)
    # Values as written where given (a mapping stays a mapping), the parsed defaults elsewhere.
    return {f.name: raw[f.name] if f.name in raw else section_dict(getattr(parsed, f.name))
            for f in dataclasses.fields(parsed)}


def _dedupe(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split a state dict into unique tensors and ``{alias: kept name}``.

    Tensors that are the same view of the same storage are aliases; other storage sharing (one
    tensor a slice of another) is broken by copying, which safetensors requires.
    """
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in state.items():
        t = t.detach()
        if t.device.type == "meta":
            raise CheckpointError(f"{name}: is on the meta device (a model built for shapes only cannot be saved)")
        ptr = t.untyped_storage().data_ptr()
        ident = (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and ident in seen:
            aliases[name] = seen[ident]
            continue
        if t.numel() and ptr in storages:
            t = t.clone()
        else:
            seen[ident] = name
            storages.add(ptr)
        tensors[name] = t.contiguous().cpu()
    return tensors, aliases


def save_checkpoint(
    directory: str | Path,
    model: nn.Module,
    *,
    model_cfg: Any,
    vocab_path: str | Path,
    text_cfg: Mapping[str, Any],
    codec_cfg: Mapping[str, Any],
    stage: str,
    training_type: str,
    parent_sha256: str | None,
    data_index_sha256: str | None,
    step: int,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors`` then ``model.json`` into ``directory``, each atomically.

    Args:
        directory: the checkpoint folder (created if missing).
        model: the model whose ``state_dict()`` is saved.
        model_cfg: the ``ModelConfig`` it was built from (rebuilt at load).
        vocab_path: the ``bpe.model`` its text ids refer to.
        text_cfg: the ``text`` config section (normaliser) as a dict.
        codec_cfg: the ``codec`` config section as a dict.
        stage: e.g. ``"pretrained"``, ``"stage1"``.
        training_type: ``"full"`` or ``"lora"``.
        parent_sha256: :func:`checkpoint_sha256` of the checkpoint this one started from (or of
            the imported ``gpt.pth``), None for scratch.
        data_index_sha256: sha256 of the codes index it was trained on, if any.
        step: optimiser step.
        extra: more JSON-able metadata (seed, metrics ...), stored under ``extra``.

    Returns:
        The folder.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, aliases = _dedupe(model.state_dict())
    weights = directory / WEIGHTS
    # model.json is the commit marker: remove an old one first, so a crash while the new weights
    # are written leaves "no checkpoint" rather than old metadata over new weights.
    (directory / META).unlink(missing_ok=True)
    with atomic_path(weights) as tmp:
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    vocab_copy = directory / VOCAB
    if not (vocab_copy.exists() and vocab_copy.resolve() == Path(vocab_path).resolve()):
        with atomic_path(vocab_copy) as tmp:
            shutil.copyfile(vocab_path, tmp)
    n_params = sum(p.numel() for p in model.parameters())
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": section_dict(model_cfg) if dataclasses.is_dataclass(model_cfg) else dict(model_cfg),
        "vocab": {**vocab_info(vocab_path), "file": VOCAB},
        "text": dict(text_cfg),
        "codec": dict(codec_cfg),
        "stage": stage,
        "training_type": training_type,
        "parent_sha256": parent_sha256,
        "data_index_sha256": data_index_sha256,
        "step": int(step),
        "weights": {
            "file": WEIGHTS,
            "bytes": weights.stat().st_size,
            "sha256": sha256_file(weights),
            "n_tensors": len(tensors),
            "n_params": n_params,
            "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        },
        "aliases": aliases,
        "versions": package_versions(),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "extra": dict(extra or {}),
    }
    write_json(directory / META, meta)
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    """Read and check ``model.json`` of a checkpoint folder.

    Raises:
        CheckpointError: missing, not JSON, or not one of our checkpoints.
    """
    path = Path(directory) / META
    if not path.is_file():
        raise CheckpointError(f"{path}: not found; {directory} is not a checkpoint folder (or its save was interrupted)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the file is damaged") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an indextts checkpoint description (no format: {FORMAT!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: written by a newer indextts (format {meta['format_version']} > {FORMAT_VERSION}); upgrade"
        )
    return meta


def check_vocab(meta: Mapping[str, Any], vocab_path: str | Path, where: str | Path) -> None:
    """Refuse ``vocab_path`` unless its sha256 is the one recorded in ``meta``.

    Raises:
        VocabMismatchError: naming both files and both hashes.
    """
    vocab_path = Path(vocab_path)
    if not vocab_path.is_file():
        raise CheckpointError(f"{vocab_path}: vocabulary file not found")
    rec = meta["vocab"]
    got = sha256_file(vocab_path)
    if got != rec["sha256"]:
        raise VocabMismatchError(
            f"{where}: vocabulary mismatch. The checkpoint was trained with {rec['path']} "
            f"(sha256 {rec['sha256'][:16]}..., {rec.get('n_pieces')} pieces) but {vocab_path.resolve()} "
            f"(sha256 {got[:16]}...) was given. Its token ids would not match the text embedding: "
            "use the bpe.model the checkpoint was trained with, or start again from an import "
            "with this vocabulary."
        )


def checkpoint_vocab(directory: str | Path) -> Path:
    """The ``bpe.model`` of a checkpoint folder: its own copy, or for a folder written before
    copies were kept, the path ``model.json`` records (either is checked by sha256 at load).

    Raises:
        CheckpointError: neither exists; the message names both places.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    own = directory / meta["vocab"].get("file", VOCAB)
    if own.is_file():
        return own
    recorded = Path(meta["vocab"]["path"])
    if recorded.is_file():
        return recorded
    raise CheckpointError(
        f"{directory}: no vocabulary: neither {own} nor the recorded {recorded} exists. Copy the bpe.model the "
        "checkpoint was trained with into the folder as bpe.model."
    )


def _read_weights(path: Path, meta: Mapping[str, Any], device: str) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    rec = meta.get("weights", {})
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    size = path.stat().st_size
    if rec.get("bytes") is not None and size != rec["bytes"]:
        raise CheckpointError(
            f"{path}: {size} bytes but model.json records {rec['bytes']}: the file is truncated or "
            "was replaced after the checkpoint was written. Copy the folder again or use another checkpoint."
        )
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            header = f.metadata() or {}
            if header.get("format") != FORMAT:
                raise CheckpointError(f"{path}: a safetensors file, but not written by indextts (no format={FORMAT} tag)")
            return {k: f.get_tensor(k) for k in f.keys()}
    except CheckpointError:
        raise
    except Exception as e:  # SafetensorError for bad headers, OSError for short reads
        raise CheckpointError(
            f"{path}: cannot be read as safetensors ({type(e).__name__}: {e}); the file is truncated, "
            "damaged or of another format."
        ) from e


def load_state(directory: str | Path, *, vocab_path: str | Path, device: str = "cpu",
               verify_sha256: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The checked state dict and ``model.json`` of a checkpoint folder, without building a model.

    Args:
        directory: checkpoint folder.
        vocab_path: the ``bpe.model`` it will be used with (sha256 must match).
        device: where the tensors go.
        verify_sha256: also hash the weights (slow for large models; the size is always checked).

    Raises:
        CheckpointError / VocabMismatchError.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    check_vocab(meta, vocab_path, directory)
    path = directory / meta.get("weights", {}).get("file", WEIGHTS)
    state = _read_weights(path, meta, device)
    if verify_sha256 and sha256_file(path) != meta["weights"]["sha256"]:
        raise CheckpointError(f"{path}: sha256 differs from model.json; the file was modified or damaged")
    for alias, kept in meta.get("aliases", {}).items():
        if kept not in state:
            raise CheckpointError(f"{path}: alias {alias} points to missing tensor {kept}")
        state[alias] = state[kept]
    return state, meta


def model_config_from_meta(meta: Mapping[str, Any], where: str = META):
    """Rebuild the ``ModelConfig`` recorded in ``model.json``."""
    from indextts.model import ModelConfig

    try:
        return parse_section(ModelConfig, meta["model"], f"{where}:model")
    except ConfigError as e:
        raise CheckpointError(f"{where}: the model config does not fit this version of indextts:\n{e}") from e


def check_state(model: nn.Module, state: Mapping[str, torch.Tensor], where: str | Path) -> None:
    """Raise CheckpointError listing every missing, unexpected and mis-shaped key."""
    ours = model.state_dict()
    missing = [k for k in ours if k not in state]
    unexpected = [k for k in state if k not in ours]
    shapes = [
        f"{k}: file {list(state[k].shape)} vs model {list(v.shape)}"
        for k, v in ours.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or shapes:

        def fmt(title: str, items: list[str]) -> str:
            if not items:
                return ""
            more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
            return f"\n  {title} ({len(items)}):\n    " + "\n    ".join(items[:20]) + more

        raise CheckpointError(
            f"{where}: the weights do not fit the model built from its config"
            + fmt("missing", missing)
            + fmt("unexpected", unexpected)
            + fmt("shape mismatch", shapes)
        )


def load_checkpoint(directory: str | Path, *, vocab_path: str | Path, device: str = "cpu",
                    verify_sha256: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Build the model recorded in ``model.json`` and load its weights.

    Args:
        directory: checkpoint folder.
        vocab_path: the ``bpe.model`` the model will be used with; refused unless it is the one
            the checkpoint was trained with (by sha256).
        device: device for the model.
        verify_sha256: also hash the weights file against ``model.json``.

    Returns:
        (model in eval mode, the ``model.json`` contents).

    Raises:
        VocabMismatchError: another vocabulary.
        CheckpointError: missing/damaged/foreign files, or keys and shapes that do not fit.
    """
    from indextts.model import build_model

    directory = Path(directory)
    state, meta = load_state(directory, vocab_path=vocab_path, device="cpu", verify_sha256=verify_sha256)
    cfg = model_config_from_meta(meta, str(directory / META))
    model = build_model(cfg)
    check_state(model, state, directory / WEIGHTS)
    model.load_state_dict(state, strict=True)
    model.to(device)
    model.eval()
    return model, meta


def checkpoint_sha256(directory: str | Path) -> str:
    """The identity of a checkpoint: the sha256 of its ``model.safetensors`` (a ``.pth`` file's
    own sha256 when given a file), used as ``parent_sha256`` by the checkpoint trained from it."""
    path = Path(directory)
    if path.is_dir():
        path = path / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{path}: not found")
    return sha256_file(path)


def tensor_equal(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys whose tensors differ (in presence, shape, dtype or value) between two state dicts."""
    diff = sorted(set(a) ^ set(b))
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if x.shape != y.shape or x.dtype != y.dtype or not torch.equal(x.cpu(), y.cpu()):
            diff.append(k)
    return diff


__all__ = [
    "CheckpointError",
    "VocabMismatchError",
    "save_checkpoint",
    "load_checkpoint",
    "load_state",
    "read_meta",
    "check_vocab",
    "checkpoint_sha256",
    "checkpoint_vocab",
    "package_versions",
    "vocab_info",
    "tensor_equal",
]
