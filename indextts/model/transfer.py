"""Import the released IndexTTS2 ``gpt.pth`` into our model and export ours back to that layout.

Our :class:`~indextts.model.unified_voice.UnifiedVoice` keeps the official parameter names, so the
import is a key-by-key copy with three twists, each reported rather than hidden:

* The GPT-2 blocks are stored by the official code as HF ``Conv1D`` weights ``[in, out]``; where
  our block uses ``nn.Linear`` (``[out, in]``) the weight is transposed on the way in and out.
* A tensor whose shape differs (a different conditioning feature size, codec codebook, text
  vocabulary, fewer layers ...) is left at our fresh initialisation and listed with the reason.
* The text embedding and text head are transferred *by piece string* when both SentencePiece
  models are given (:func:`transfer_vocab`): a piece shared by the two vocabularies keeps its exact
  row wherever its id moved to; a new piece starts from the mean of the old pieces its surface
  string splits into.

Row layout of the text tables: the official model has ``number_text_tokens + 1`` rows (12001 for
the 12000-piece ``bpe.model``). The ``+ 1`` is inherited from Tortoise, where the start-of-text
token was the id *after* the vocabulary; IndexTTS sets ``start_text_token=0`` and
``stop_text_token=1`` (the tokenizer's ``<s>`` and ``</s>``), so the last row is never produced by
the tokenizer nor predicted as a target. We keep it so the shapes match, and carry it over as
"the extra row" (old row ``n_old`` to new row ``n_new``).

Nothing here unpickles arbitrary objects: files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import torch
from torch import nn

# Top-level modules of the official UnifiedVoice state dict (shared/reference TSV). A key of ours
# outside these has no place in gpt.pth.
OFFICIAL_MODULES = (
    "conditioning_encoder",
    "perceiver_encoder",
    "emo_conditioning_encoder",
    "emo_perceiver_encoder",
    "text_embedding",
    "emo_layer",
    "emovec_layer",
    "mel_embedding",
    "gpt",
    "mel_pos_embedding",
    "text_pos_embedding",
    "final_norm",
    "text_head",
    "mel_head",
    "speed_emb",
)

# The four GPT-2 projections that HF stores as Conv1D [in, out].
_CONV1D_RE = re.compile(r"^gpt\.h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")

# Keys that the official inference wrapper adds to a live model; a gpt.pth saved from such a
# model carries them. They duplicate weights we load under their own names.
_DROPPED = (
    (re.compile(r"^inference_model\."), "inference wrapper's copy of gpt/mel weights (not a parameter of the model)"),
    (re.compile(r"^gpt\.wte\.weight$"), "alias of mel_embedding.weight set by the inference wrapper"),
    (re.compile(r"^ds_engine\."), "DeepSpeed inference engine's copy (not a parameter of the model)"),
)

_TEXT_KEYS = ("text_embedding.weight", "text_head.weight", "text_head.bias")
# Our tables and heads for codebooks 1..K-1 (model.n_codebooks > 1); the official file has none.
_EXTRA_CODEBOOK_MODULES = ("extra_mel_embedding.", "extra_mel_head.")
_POS_KEYS = ("mel_pos_embedding.emb.weight", "text_pos_embedding.emb.weight")


class TransferError(ValueError):
    """A pretrained file or vocabulary cannot be used; the message names the file and the fix."""


# --------------------------------------------------------------------------------------------
# Reports


@dataclass
class VocabTransferReport:
    """What :func:`transfer_vocab` did, by new-vocabulary piece.

    ``shared`` pieces exist in both vocabularies and kept their exact rows; ``moved`` of them have a
    different id in the new vocabulary. ``decomposed`` new pieces start from the mean of the old
    pieces their text splits into; ``fallback`` pieces (no usable split, e.g. a script the old
    vocabulary never saw) start from the mean of all old rows plus small noise.
    """

    n_old: int
    n_new: int
    shared: int = 0
    moved: int = 0
    special: int = 0
    decomposed: int = 0
    fallback: int = 0
    extra_rows: int = 0
    examples: dict[str, list[str]] = field(default_factory=dict)
    # new id -> old id for every piece that kept a row (special ids included)
    id_map: dict[int, int] = field(default_factory=dict, repr=False)

    @property
    def coverage(self) -> float:
        """Share of the new vocabulary's pieces (special ids included) found in the old one."""
        return (self.shared + self.special) / max(self.n_new, 1)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("id_map")
        d["coverage"] = round(self.coverage, 6)
        return d

    def summary(self) -> str:
        return (
            f"vocab transfer {self.n_old} -> {self.n_new} pieces: {self.shared} shared "
            f"({self.moved} moved id), {self.special} special, {self.decomposed} from old sub-pieces, "
            f"{self.fallback} from the mean of old rows; coverage {self.coverage:.1%}"
        )


@dataclass
class TransferReport:
    """The result of :func:`import_official`: every key of both sides is in exactly one list.

    Attributes:
        source: the file imported.
        wrapped: the state dict was found under a ``"model"`` key.
        loaded: our keys copied unchanged (after the Conv1D transposition where needed).
        transposed: the subset of ``loaded`` that was transposed from Conv1D ``[in, out]``.
        transferred: our keys filled partly from the file, with how (vocab by piece, position
            table prefix).
        reinitialised: our keys left at fresh initialisation, with the reason.
        unused: keys of the file we did not take, with the reason.
        vocab: the piece-string transfer, when both SentencePiece models were given.
        notes: assumptions the import made (e.g. text rows loaded by id).
    """

    source: str
    wrapped: bool = False
    loaded: list[str] = field(default_factory=list)
    transposed: list[str] = field(default_factory=list)
    transferred: dict[str, str] = field(default_factory=dict)
    reinitialised: dict[str, str] = field(default_factory=dict)
    unused: dict[str, str] = field(default_factory=dict)
    vocab: VocabTransferReport | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "notes": self.notes,
            "wrapped": self.wrapped,
            "counts": {
                "loaded": len(self.loaded),
                "transposed": len(self.transposed),
                "transferred": len(self.transferred),
                "reinitialised": len(self.reinitialised),
                "unused": len(self.unused),
            },
            "loaded": self.loaded,
            "transposed": self.transposed,
            "transferred": self.transferred,
            "reinitialised": self.reinitialised,
            "unused": self.unused,
            "vocab": self.vocab.to_dict() if self.vocab else None,
        }

    def summary(self) -> str:
        lines = [
            f"imported {self.source}{' (wrapped under model)' if self.wrapped else ''}: "
            f"{len(self.loaded)} loaded ({len(self.transposed)} transposed from Conv1D), "
            f"{len(self.transferred)} transferred, {len(self.reinitialised)} re-initialised, "
            f"{len(self.unused)} unused"
        ]
        for k, why in self.transferred.items():
            lines.append(f"  transferred    {k}: {why}")
        for k, why in self.reinitialised.items():
            lines.append(f"  re-initialised {k}: {why}")
        for k, why in _collapse(self.unused).items():
            lines.append(f"  unused         {k}: {why}")
        if self.vocab:
            lines.append("  " + self.vocab.summary())
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _collapse(reasons: Mapping[str, str], limit: int = 3) -> dict[str, str]:
    """Group keys that share a reason so hundreds of ``inference_model.*`` keys print as one line."""
    by_reason: dict[str, list[str]] = {}
    for k, why in reasons.items():
        by_reason.setdefault(why, []).append(k)
    out = {}
    for why, keys in by_reason.items():
        if len(keys) <= limit:
            out.update({k: why for k in keys})
        else:
            out[f"{keys[0]} ... ({len(keys)} keys)"] = why
    return out


# --------------------------------------------------------------------------------------------
# Reading an official file


class OfficialFile(NamedTuple):
    """What :func:`load_official_state_dict` found in a file."""

    state: dict[str, torch.Tensor]
    wrapped: bool  # the weights were under "model"
    other_keys: list[str]  # the wrapper's other entries (optimizer, step ...), not used


def load_official_state_dict(path: str | Path) -> OfficialFile:
    """Read a ``gpt.pth``: a plain state dict or one wrapped under ``"model"``.

    Loaded with ``weights_only=True``, so a file that needs arbitrary unpickling is refused. A
    ``module.`` prefix (a DistributedDataParallel save) is stripped when every key has it.

    Returns:
        :class:`OfficialFile` (state dict, whether it was wrapped, the wrapper's other keys).

    Raises:
        TransferError: the file is missing, not a torch file, not weights-only loadable, or does
            not hold a ``{name: tensor}`` mapping.
    """
    path = Path(path)
    if not path.is_file():
        raise TransferError(f"{path}: pretrained gpt file not found (config pretrained.gpt / --gpt)")
    try:
        try:
            # mmap: a 3.5 GB file is paged in while copying, not held twice in memory
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:  # pickle errors, zip errors, truncation: all mean "not a usable file"
        raise TransferError(
            f"{path}: cannot be read as a weights-only PyTorch state dict ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). Expected the released IndexTTS2 gpt.pth "
            "or a file written by 'indextts export-gpt'."
        ) from e
    wrapped, other = False, []
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        other = [str(k) for k in obj if k != "model"]
        obj, wrapped = obj["model"], True
    if not isinstance(obj, Mapping) or not obj:
        raise TransferError(f"{path}: holds a {type(obj).__name__}, not a state dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise TransferError(
            f"{path}: not a state dict: {len(bad)} entries are not tensors (first: {bad[0]!r}). "
            "Expected {name: tensor} or {'model': {name: tensor}}."
        )
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return OfficialFile(sd, wrapped, other)


def conv1d_keys(model: nn.Module) -> set[str]:
    """Our state-dict keys that the official file stores transposed (HF Conv1D ``[in, out]``).

    Decided per module: a GPT-2 projection implemented as ``nn.Linear`` holds ``[out, in]`` and
    needs the transpose; one implemented Conv1D-style already matches.
    """
    keys = set()
    for name, _ in model.named_parameters():
        if _CONV1D_RE.match(name):
            module = model.get_submodule(name.rsplit(".", 1)[0])
            if isinstance(module, nn.Linear):
                keys.add(name)
    return keys


def _shape(t: torch.Tensor) -> list[int]:
    return list(t.shape)


def _mismatch_reason(key: str, official: torch.Tensor, ours: torch.Tensor) -> str:
    what = f"shape differs: official {_shape(official)} vs ours {_shape(ours)}"
    if key.startswith(("conditioning_encoder.embed.", "emo_conditioning_encoder.embed.")):
        return f"{what} (conditioning feature size differs from the official 1024-dim w2v-BERT input)"
    if key.startswith(("mel_embedding.", "mel_head.")):
        return f"{what} (codec vocabulary differs: codebook size + start/stop tokens)"
    if key in _TEXT_KEYS:
        return f"{what} (text vocabulary differs; give the official bpe.model as old_bpe to transfer by piece)"
    if key.endswith(".pe"):
        return f"{what} (sinusoidal position table, recomputed)"
    return what


# --------------------------------------------------------------------------------------------
# Vocabulary transfer by piece string


def _as_processor(sp: Any):
    import sentencepiece as spm

    if isinstance(sp, spm.SentencePieceProcessor):
        return sp
    path = Path(sp)
    if not path.is_file():
        raise TransferError(f"{path}: SentencePiece model not found")
    proc = spm.SentencePieceProcessor()
    try:
        proc.Load(str(path))
    except Exception as e:
        raise TransferError(f"{path}: not a SentencePiece model ({e})") from e
    return proc


def _decompose(old_sp, old_index: Mapping[str, int], piece: str) -> list[int] | None:
    """Old-vocabulary ids that ``piece``'s text splits into, or None if there is no clean split.

    The old tokenizer adds a dummy ``▁`` in front of its input (a word start). That is right for a
    ``▁``-prefixed piece, whose text is encoded as a word; for a word-internal piece the dummy
    ``▁`` is removed again from the first old piece. A split that contains ``<unk>`` is no split.
    """
    word_start = piece.startswith("\u2581")
    text = piece.replace("\u2581", " ")
    if not text.strip():
        return None
    pieces = list(old_sp.encode(text, out_type=str))
    if not word_start and pieces and pieces[0].startswith("\u2581"):
        rest = pieces[0][1:]
        pieces = pieces[1:]
        if rest:
            # the old piece held the word start too; its word-internal text, or its characters
            pieces[0:0] = [rest] if rest in old_index else list(rest)
    ids = []
    unk = old_sp.unk_id()
    for p in pieces:
        i = old_index.get(p)
        if i is None or i == unk:
            return None
        ids.append(i)
    return ids or None


@torch.no_grad()
def transfer_vocab(
    old_sp: Any,
    new_sp: Any,
    old_emb: torch.Tensor,
    old_head_w: torch.Tensor,
    old_head_b: torch.Tensor,
    new_emb: torch.Tensor,
    new_head_w: torch.Tensor,
    new_head_b: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    noise_std: float = 0.1,
) -> VocabTransferReport:
    """Fill the new text embedding and text head from the old ones, by piece string.

    Row ``i`` of the new tables stands for piece ``new_sp.id_to_piece(i)``:

    * ids 0/1/2 (``<s>``, ``</s>``, ``<unk>``) map to themselves;
    * a piece present in the old vocabulary gets its old rows exactly, whatever its old id;
    * a new piece gets the mean of the old rows of the pieces the old tokenizer splits its text
      into (handling the ``▁`` word-start marker), when every part is a known piece;
    * otherwise the mean of all old rows plus Gaussian noise (``noise_std`` times the per-column
      std of the old rows) drawn from ``generator``, so fresh pieces are distinguishable;
    * rows beyond the vocabulary (the official tables have one, see the module doc) are copied in
      order.

    Args:
        old_sp, new_sp: ``SentencePieceProcessor`` objects or paths to ``.model`` files.
        old_emb, old_head_w, old_head_b: the pretrained ``text_embedding.weight`` ``[n_old+x, D]``,
            ``text_head.weight`` ``[n_old+x, D]`` and ``text_head.bias`` ``[n_old+x]``.
        new_emb, new_head_w, new_head_b: our tables ``[n_new+x, D]`` etc., written in place.
        generator: the random source for fallback noise (a fixed default seed when None).
        noise_std: fallback noise relative to the old rows' per-column std.

    Returns:
        A :class:`VocabTransferReport`.

    Raises:
        TransferError: a table's row count does not fit its vocabulary (the wrong bpe.model).
    """
    old_sp, new_sp = _as_processor(old_sp), _as_processor(new_sp)
    n_old, n_new = old_sp.get_piece_size(), new_sp.get_piece_size()
    x_old, x_new = old_emb.shape[0] - n_old, new_emb.shape[0] - n_new
    if x_old < 0 or x_old != old_head_w.shape[0] - n_old or x_old != old_head_b.shape[0] - n_old:
        raise TransferError(
            f"the pretrained text tables have {old_emb.shape[0]} rows but the old bpe.model has {n_old} "
            "pieces: pretrained.bpe must be the bpe.model released with that gpt.pth"
        )
    if x_new < 0 or x_new != new_head_w.shape[0] - n_new or x_new != new_head_b.shape[0] - n_new:
        raise TransferError(f"our text tables have {new_emb.shape[0]} rows but the new bpe.model has {n_new} pieces")
    if old_emb.shape[1] != new_emb.shape[1]:
        raise TransferError(f"text embedding width differs: pretrained {old_emb.shape[1]} vs ours {new_emb.shape[1]}")
    if generator is None:
        generator = torch.Generator().manual_seed(0)

    def src(t: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        return t.to(device=dst.device, dtype=dst.dtype)

    oe, ohw, ohb = src(old_emb, new_emb), src(old_head_w, new_head_w), src(old_head_b, new_head_b)
    old_index = {old_sp.id_to_piece(i): i for i in range(n_old)}
    rep = VocabTransferReport(n_old=n_old, n_new=n_new, examples={"moved": [], "decomposed": [], "fallback": []})

    fallback_ids = []
    for i in range(n_new):
        piece = new_sp.id_to_piece(i)
        if i < 3:
            j = i
            rep.special += 1
        elif piece in old_index:
            j = old_index[piece]
            rep.shared += 1
            if j != i:
                rep.moved += 1
                if len(rep.examples["moved"]) < 10:
                    rep.examples["moved"].append(f"{piece} {j}->{i}")
        else:
            j = None
        if j is not None:
            rep.id_map[i] = j
            new_emb[i] = oe[j]
            new_head_w[i] = ohw[j]
            new_head_b[i] = ohb[j]
            continue
        parts = _decompose(old_sp, old_index, piece)
        if parts:
            idx = torch.tensor(parts, device=new_emb.device)
            new_emb[i] = oe[idx].mean(0)
            new_head_w[i] = ohw[idx].mean(0)
            new_head_b[i] = ohb[idx].mean(0)
            rep.decomposed += 1
            if len(rep.examples["decomposed"]) < 10:
                rep.examples["decomposed"].append(f"{piece} = " + " + ".join(old_sp.id_to_piece(p) for p in parts))
        else:
            fallback_ids.append(i)
            if len(rep.examples["fallback"]) < 10:
                rep.examples["fallback"].append(piece)

    if fallback_ids:
        rep.fallback = len(fallback_ids)
        idx = torch.tensor(fallback_ids, device=new_emb.device)
        for table, old in ((new_emb, oe), (new_head_w, ohw)):
            base = old[:n_old].float()
            noise = torch.randn((len(fallback_ids), base.shape[1]), generator=generator) * (noise_std * base.std(0).cpu())
            table[idx] = (base.mean(0).cpu() + noise).to(device=table.device, dtype=table.dtype)
        new_head_b[idx] = ohb[:n_old].float().mean().to(new_head_b.dtype)

    for k in range(min(x_old, x_new)):
        new_emb[n_new + k] = oe[n_old + k]
        new_head_w[n_new + k] = ohw[n_old + k]
        new_head_b[n_new + k] = ohb[n_old + k]
        rep.extra_rows += 1
    return rep


# --------------------------------------------------------------------------------------------
# Import and export


@torch.no_grad()
def import_official(
    gpt_pth: str | Path | Mapping[str, torch.Tensor],
    model: nn.Module,
    *,
    old_bpe: Any = None,
    new_bpe: Any = None,
    generator: torch.Generator | None = None,
) -> TransferReport:
    """Load an official IndexTTS2 ``gpt.pth`` into ``model`` (in place), key by key.

    Every official key is either loaded (shape equal after the Conv1D transposition), used for a
    partial transfer (text tables by piece string, position tables by prefix) or listed as unused
    with the reason; every key of ours not loaded is listed as re-initialised with the reason
    (keeping the fresh initialisation ``model`` was built with). Nothing is skipped silently.

    Args:
        gpt_pth: path to the file (plain or wrapped under ``"model"``), or a state dict.
        model: our UnifiedVoice, freshly built (its initialisation is kept where nothing loads).
        old_bpe: the official ``bpe.model`` the file was trained with (path or processor).
        new_bpe: our ``bpe.model``. With both, the text tables move by piece string; without,
            equal-shaped text tables load by id (and the report says so).
        generator: random source for vocab-transfer fallback noise.

    Returns:
        A :class:`TransferReport`.

    Raises:
        TransferError: unreadable file, or a vocabulary that does not fit its table.
    """
    if isinstance(gpt_pth, Mapping):
        official, wrapped, source = dict(gpt_pth), False, "<state dict>"
    else:
        official, wrapped, other = load_official_state_dict(gpt_pth)
        source = str(gpt_pth)
    report = TransferReport(source=source, wrapped=wrapped)
    if wrapped and other:
        report.notes.append(f"the file's entries besides 'model' were not used: {', '.join(sorted(other))}")
    ours = model.state_dict()
    transpose = conv1d_keys(model)

    taken: set[str] = set()
    for key in list(official):
        for pattern, why in _DROPPED:
            if pattern.match(key):
                report.unused[key] = why
                taken.add(key)
                break

    def official_as_ours(key: str) -> torch.Tensor:
        t = official[key]
        return t.t() if key in transpose else t

    vocab_done = False
    if (old_bpe is None) != (new_bpe is None):
        raise TransferError("vocab transfer needs both the official bpe.model (old_bpe) and ours (new_bpe)")
    if old_bpe is not None and all(k in official and k in ours for k in _TEXT_KEYS):
        report.vocab = transfer_vocab(
            old_bpe,
            new_bpe,
            official["text_embedding.weight"],
            official["text_head.weight"],
            official["text_head.bias"],
            ours["text_embedding.weight"],
            ours["text_head.weight"],
            ours["text_head.bias"],
            generator=generator,
        )
        for k in _TEXT_KEYS:
            report.transferred[k] = (
                f"by piece string: {report.vocab.shared} shared, {report.vocab.decomposed} decomposed, "
                f"{report.vocab.fallback} mean-initialised of {report.vocab.n_new} pieces"
            )
            taken.add(k)
        vocab_done = True

    for key, dst in ours.items():
        if vocab_done and key in _TEXT_KEYS:
            continue
        if key not in official:
            if key.startswith(_EXTRA_CODEBOOK_MODULES):
                report.reinitialised[key] = (
                    f"codebook {key.split('.')[1][2:]} of the delay pattern: IndexTTS2 predicts one code stream, "
                    "so the extra codebooks' tables and heads start fresh")
            else:
                report.reinitialised[key] = "not in the official file"
            continue
        taken.add(key)
        src = official_as_ours(key)
        if src.shape == dst.shape:
            dst.copy_(src.to(dtype=dst.dtype))
            report.loaded.append(key)
            if key in transpose:
                report.transposed.append(key)
            if key == "text_embedding.weight" and old_bpe is None:
                report.notes.append(
                    "text tables loaded by id: no official bpe.model was given, so ids are assumed to mean "
                    "the same pieces in both vocabularies (give it as old_bpe / pretrained.bpe to transfer by piece)"
                )
        elif key in _POS_KEYS and src.ndim == 2 and src.shape[1] == dst.shape[1]:
            n = min(src.shape[0], dst.shape[0])
            dst[:n] = src[:n].to(dtype=dst.dtype)
            report.transferred[key] = (
                f"first {n} positions copied (official {src.shape[0]} rows, ours {dst.shape[0]}: maximum length differs)"
            )
        else:
            report.reinitialised[key] = _mismatch_reason(key, src, dst)

    for key in official:
        if key not in taken:
            report.unused[key] = "our model has no such parameter (different layer count or architecture option)"
    if not report.loaded and not report.transferred:
        raise TransferError(
            f"{source}: none of its {len(official)} tensors fits our model (first keys: "
            f"{', '.join(list(official)[:3])}); is this the IndexTTS2 GPT checkpoint (gpt.pth)?"
        )
    # Our state_dict() tensors share storage with the parameters, so the copies above landed in
    # the model; the keys stay in a stable order for the report.
    report.loaded.sort()
    return report


def export_official(model: nn.Module, *, drop: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Our weights in the official ``gpt.pth`` layout (Conv1D weights back to ``[in, out]``).

    Every tensor is a contiguous copy (no shared storage, so ``torch.save`` writes only it).

    Args:
        model: our UnifiedVoice (any device, ``meta`` included for shape checks).
        drop: key prefixes of ours to leave out on purpose (training-only heads).

    Returns:
        ``{official key: tensor}``.

    Raises:
        TransferError: the model predicts more than one codebook, or has other keys with no
            place in the official layout, which IndexTTS2's tooling could not load.
    """
    n_codebooks = getattr(getattr(model, "cfg", None), "n_codebooks", 1)
    if n_codebooks > 1:
        raise TransferError(
            f"this model predicts {n_codebooks} codebooks (model.n_codebooks, the delay pattern), and the official "
            "gpt.pth layout has room for one: IndexTTS2's tooling reads one code stream, and a model cut down "
            "to codebook 0 could not produce speech through DAC. Use our checkpoint folder instead "
            "(model.safetensors + model.json; indextts.checkpoint.load_checkpoint loads it, and "
            "indextts.audio.dac.decode_codes turns its codes into audio through the pipeline's DAC)."
        )
    transpose = conv1d_keys(model)
    out: dict[str, torch.Tensor] = {}
    extra = []
    for key, t in model.state_dict().items():
        if any(key.startswith(p) for p in drop):
            continue
        if key.split(".", 1)[0] not in OFFICIAL_MODULES:
            extra.append(key)
            continue
        t = t.detach()
        out[key] = (t.t() if key in transpose else t).contiguous().clone()
    if extra:
        raise TransferError(
            f"the model has {len(extra)} parameters with no place in the official gpt.pth layout "
            f"({', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}); IndexTTS2 could not load them. "
            "Export a single-codebook model, or pass drop= for training-only parts."
        )
    return out


def save_official(model: nn.Module, path: str | Path, *, drop: tuple[str, ...] = ()) -> Path:
    """Write :func:`export_official` as a plain state dict with ``torch.save``, atomically."""
    from indextts.files import atomic_path

    sd = {k: v.cpu() for k, v in export_official(model, drop=drop).items()}
    with atomic_path(path) as tmp:
        torch.save(sd, tmp)
    return Path(path)
