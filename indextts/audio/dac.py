"""The neural audio codec: Descript Audio Codec (DAC) loading, exact batched encoding, and the
tiny randomly initialised codec of the demo.

Weights file format
    We read the files DAC itself writes with ``model.save(path, package=False)`` and that its
    releases ship (``weights_16khz.pth`` ...): a ``torch.save`` dict
    ``{"state_dict": {name: tensor}, "metadata": {"kwargs": {constructor kwargs}}}``. Only
    tensors, dicts, lists and plain numbers, so ``torch.load(weights_only=True)`` reads it and
    nothing is unpickled. Two things differ from ``DAC.load``: it tries ``torch.package`` first
    (pickled code, unsafe; we refuse such files and say how to convert them), and it loads the
    state dict with ``strict=False``, so a truncated or mismatched file gives a half-random model
    without a word. :func:`load_codec` checks every key and shape and names what is wrong.

Exact batching
    DAC's encoder is a stack of non-causal, zero-padded convolutions. Encoding a short utterance
    alone, every conv sees zeros past its end; in a batch padded to the longest one, it sees
    whatever the previous layer computed from the padding (bias, Snake), so the last frames of
    every shorter utterance change (measured: about one frame per utterance, whose codes differ).
    :func:`encode_batch` masks the input of every conv with a kernel wider than 1 back to zero
    past each utterance's own length, which is exactly the padding that conv applies to the
    utterance alone; the result is the same computation, not an approximation.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import math
import pickle
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from indextts.config import ConfigError
from indextts.files import atomic_path, sha256_file

# The demo's tiny DAC: 8-channel encoder, 3 codebooks of 16, so every code path of a real
# codec runs on a CPU in a blink. Its strides multiply to a hop of 320 samples, so at 16 kHz it
# gives 50 frames/s like the official 16 kHz model: rates [2, 4] (hop 8) would give 2000
# frames/s, code sequences 40x longer than a real codec's for the demo GPT to learn, and were
# also slower (the quantiser runs per frame).
DEMO_CODEC_KWARGS: dict = {
    "encoder_dim": 8,
    "encoder_rates": [4, 8, 10],
    "decoder_dim": 32,
    "decoder_rates": [10, 8, 4],
    "n_codebooks": 3,
    "codebook_size": 16,
    "codebook_dim": 4,
    "sample_rate": 16000,
}

# The official 16 kHz release (weights_16khz.pth, tag 0.0.5): the architecture the throughput
# goal is stated for. Used by the benchmark with random weights.
DAC_16KHZ_KWARGS: dict = {
    "encoder_dim": 64,
    "encoder_rates": [2, 4, 5, 8],
    "decoder_dim": 1536,
    "decoder_rates": [8, 5, 4, 2],
    "n_codebooks": 12,
    "codebook_size": 1024,
    "codebook_dim": 8,
    "sample_rate": 16000,
}


@dataclass(frozen=True)
class CodecInfo:
    """What a reader of the codes needs to know about the codec that made them."""

    sample_rate: int  # Hz the encoder expects; audio is resampled to it
    hop_length: int  # samples per code frame
    n_q: int  # codebooks kept (rows of every codes array)
    codebook_size: int  # codes are in [0, codebook_size)
    weights_sha256: str  # identity of the weights file
    kind: str = "dac"  # the codec.kind that made the codes
    # semantic only: what else the codes depend on (w2v-BERT folder and stats sha256, layer, dtype).
    extra: tuple[tuple[str, str | int], ...] = ()

    @property
    def frame_rate(self) -> float:
        """Code frames per second of audio."""
        return self.sample_rate / self.hop_length

    def n_frames(self, n_samples: int) -> int:
        """Frames the codec gives for ``n_samples`` at :attr:`sample_rate`: DAC's preprocess pads
        the right end up to a whole hop; w2v-BERT's fbank drops the last partial window."""
        if self.kind == "semantic":
            from indextts.audio.w2v_bert import w2v_bert_frames

            return w2v_bert_frames(n_samples)
        return math.ceil(n_samples / self.hop_length)


class CodecLoadError(ValueError):
    """A codec weights file cannot be used; the message names the file and what to do."""


def _import_dac():
    # dac imports audiotools, which warns about optional backends on import; those warnings
    # say nothing about anything we use.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import dac

    return dac


def _is_torch_package(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(name.endswith("/.data/extern_modules") for name in z.namelist())


def _read_weights_file(path: Path) -> dict:
    if not path.exists():
        raise CodecLoadError(
            f"{path}: codec weights not found. Set codec.weights to a DAC weights file (see "
            "config/ for the official 16/24/44 kHz files), or for the demo run the make_demo_codec rule."
        )
    if _is_torch_package(path):
        raise CodecLoadError(
            f"{path}: this is a torch.package (what DAC's save() writes by default, package=True): the "
            "model pickled together with its code, which cannot be loaded safely (torch.load with "
            "weights_only=True refuses it). On a machine you trust, convert it once with "
            "`dac.DAC.load(path).save(new_path, package=False)` and point codec.weights at new_path."
        )
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CodecLoadError(f"{path}: refused by torch.load(weights_only=True), it holds more than weights: {e}") from e
    except Exception as e:  # zip/EOF errors: a truncated or foreign file
        raise CodecLoadError(f"{path}: not a readable torch weights file ({type(e).__name__}: {e})") from e
    if not isinstance(blob, dict) or "state_dict" not in blob or "metadata" not in blob:
        keys = sorted(blob)[:8] if isinstance(blob, dict) else type(blob).__name__
        raise CodecLoadError(
            f"{path}: not a DAC weights file: expected a dict with 'state_dict' and 'metadata' "
            f"(what DAC's save(package=False) writes), found {keys}"
        )
    meta = blob["metadata"]
    if not isinstance(meta, dict) or not isinstance(meta.get("kwargs"), dict):
        raise CodecLoadError(f"{path}: metadata has no 'kwargs' dict with DAC's constructor arguments")
    return blob


def state_dict_problems(model: torch.nn.Module, state: dict) -> list[str]:
    """What keeps ``state`` from loading strictly into ``model``: one line each for missing,
    unexpected and mis-shaped keys (a few named, then the count). Empty when every key the model
    has is in ``state`` with the same shape, and nothing else is."""
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    shapes = sorted(
        f"{k}: file {tuple(state[k].shape)}, model {tuple(want[k].shape)}"
        for k in set(want) & set(state)
        if tuple(state[k].shape) != tuple(want[k].shape)
    )

    def few(items: list[str]) -> str:
        return ", ".join(items[:6]) + (f" ... ({len(items)} in all)" if len(items) > 6 else "")

    lines = []
    if missing:
        lines.append(f"missing keys: {few(missing)}")
    if unexpected:
        lines.append(f"unexpected keys: {few(unexpected)}")
    if shapes:
        lines.append(f"shape mismatches: {few(shapes)}")
    return lines


def _check_state_dict(path: Path, model: torch.nn.Module, state: dict) -> None:
    """Every key the model has must be in the file with the same shape, and nothing else."""
    problems = state_dict_problems(model, state)
    if problems:
        lines = [f"{path}: the weights do not match the DAC architecture in its own metadata", *problems]
        lines.append("The file is truncated, from another DAC version, or not a DAC codec; re-download it.")
        raise CodecLoadError("\n  ".join(lines))


def load_codec(
    weights: str | Path, device: torch.device | str = "cpu", n_quantizers: int | None = None
) -> tuple[torch.nn.Module, CodecInfo]:
    """Load a DAC model for encoding, safely and strictly.

    Args:
        weights: a DAC weights file (``{"state_dict", "metadata": {"kwargs"}}``); floating tensors
            of any precision (fp32, fp16, bf16), cast to float32.
        device: where the model goes.
        n_quantizers: keep only the first N codebooks (None: all of them).

    Returns:
        ``(model, info)``: the DAC model in eval mode with weight norm folded into the conv
        weights (the same arithmetic DAC's hook does on every call, done once), and its
        :class:`CodecInfo`.

    Raises:
        CodecLoadError: missing file, unsafe or foreign format, unknown architecture, any
            missing, unexpected or mis-shaped key, or a codebook too large for int16 codes.
    """
    dac = _import_dac()
    path = Path(weights)
    blob = _read_weights_file(path)
    kwargs = dict(blob["metadata"]["kwargs"])
    accepted = set(inspect.signature(dac.DAC).parameters)
    dropped = sorted(set(kwargs) - accepted)
    if dropped:
        # DAC.load drops these too; if they mattered, the key check below fails.
        print(f"{path}: ignoring constructor kwargs this DAC version does not take: {dropped}", file=sys.stderr)
    kwargs = {k: v for k, v in kwargs.items() if k in accepted}
    if "sample_rate" not in kwargs:
        raise CodecLoadError(f"{path}: metadata kwargs do not record sample_rate; cannot know the codec's rate")
    try:
        # Built on the meta device: no memory and no random initialisation (0.6 s for the
        # full-size model), since every parameter is replaced by the file's right after.
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore", FutureWarning)  # DAC's use of the old weight_norm API
            model = dac.DAC(**kwargs)
    except Exception as e:
        raise CodecLoadError(f"{path}: DAC(**kwargs) failed for kwargs {kwargs}: {e}") from e
    state = blob["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CodecLoadError(f"{path}: 'state_dict' is not a mapping of names to tensors")
    _check_state_dict(path, model, state)
    not_float = sorted(k for k, v in state.items() if not v.is_floating_point())
    if not_float:
        raise CodecLoadError(f"{path}: {len(not_float)} tensors are not floating point (first: "
                             f"{', '.join(not_float[:6])}); these are not DAC weights")
    # A file saved in fp16 or bf16 (the committed demo codec is fp16) is computed in fp32 like any
    # other: codes are argmins and must not depend on the file's storage precision beyond its values.
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    n_codebooks = int(model.n_codebooks)
    if n_quantizers is not None and not 1 <= n_quantizers <= n_codebooks:
        raise ConfigError(f"codec.n_quantizers: {n_quantizers} is outside 1..{n_codebooks} (codebooks in {path})")
    if int(model.codebook_size) > 32768:
        raise CodecLoadError(f"{path}: codebook_size {model.codebook_size} does not fit the int16 codes format")
    for module in model.modules():
        if hasattr(module, "weight_g"):
            torch.nn.utils.remove_weight_norm(module)
    model.eval().requires_grad_(False).to(device)
    info = CodecInfo(
        sample_rate=int(model.sample_rate),
        hop_length=int(model.hop_length),
        n_q=int(n_quantizers or n_codebooks),
        codebook_size=int(model.codebook_size),
        weights_sha256=sha256_file(path),
    )
    return model, info


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """No TF32 in convolutions or matmuls inside the block (restored after): codes are
    argmins over distances and must be the fp32 ones DAC computes."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


class _PadMask:
    """Forward pre-hooks that zero every wide conv's input past each utterance's length."""

    def __init__(self, encoder: torch.nn.Module, padded_lengths: torch.Tensor, total: int):
        self.lengths = padded_lengths  # (B,) samples, multiples of the hop
        self.total = total  # T of the batch input
        self.masks: dict[int, torch.Tensor] = {}
        self.handles = [
            m.register_forward_pre_hook(self._hook)
            for m in encoder.modules()
            if isinstance(m, torch.nn.Conv1d) and m.kernel_size[0] > 1
        ]

    def _hook(self, module: torch.nn.Module, args: tuple) -> tuple:
        (x,) = args  # (B, C, t)
        t = x.shape[-1]
        keep = self.masks.get(t)
        if keep is None:
            # Every stride divides the hop, and every length is a whole number of hops, so the
            # valid length at this resolution is exact.
            valid = self.lengths * t // self.total
            keep = torch.arange(t, device=x.device)[None, :] < valid[:, None]
            self.masks[t] = keep = keep[:, None, :]  # (B, 1, t)
        return (x.masked_fill(~keep, 0.0),)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.inference_mode()
def encode_padded(
    model: torch.nn.Module, audio: torch.Tensor, lengths: Sequence[int], n_quantizers: int | None = None
) -> torch.Tensor:
    """Encode a zero-padded batch exactly; :func:`encode_batch` without the split.

    Returns:
        ``(B, n_q, F)`` int64 codes, ``F`` the longest utterance's frame count; row ``i`` is valid
        for its first ``ceil(lengths[i] / hop)`` frames (what follows is padding's codes).
    """
    hop = int(model.hop_length)
    n_frames = [math.ceil(n / hop) for n in lengths]
    total = max(n_frames) * hop
    if audio.shape[-1] < total:
        audio = torch.nn.functional.pad(audio, (0, total - audio.shape[-1]))
    else:
        audio = audio[..., :total]
    mask = None
    if len(set(n_frames)) > 1:
        padded = torch.tensor([f * hop for f in n_frames], device=audio.device)
        mask = _PadMask(model.encoder, padded, total)
    try:
        with exact_fp32():
            _, codes, *_ = model.encode(audio, n_quantizers)  # (B, n_q, total // hop)
    finally:
        if mask is not None:
            mask.remove()
    return codes


def encode_batch(
    model: torch.nn.Module, audio: torch.Tensor, lengths: Sequence[int], n_quantizers: int | None = None
) -> list[torch.Tensor]:
    """Encode a zero-padded batch; each utterance's codes equal DAC encoding it alone.

    Args:
        model: a DAC model (from :func:`load_codec`).
        audio: ``(B, 1, T)`` float32 at the codec's sample rate, utterance ``i`` in
            ``audio[i, 0, :lengths[i]]`` and zeros after it; ``T`` may be anything at least
            ``max(lengths)``.
        lengths: true sample counts.
        n_quantizers: codebooks to compute (None: all).

    Returns:
        One ``(n_q, ceil(lengths[i] / hop))`` int64 tensor per utterance, on the model's device:
        exactly the frames of ``model.encode(model.preprocess(x_i))`` for that utterance alone.
    """
    hop = int(model.hop_length)
    codes = encode_padded(model, audio, lengths, n_quantizers)
    return [codes[i, :, : math.ceil(n / hop)] for i, n in enumerate(lengths)]


@torch.inference_mode()
def decode_codes(model: torch.nn.Module, codes: torch.Tensor, *, n_codebooks_ok: bool = False) -> torch.Tensor:
    """Turn codes back into audio through the pipeline's DAC: ``decode(quantizer.from_codes(codes))``.

    Args:
        model: a DAC model (from :func:`load_codec`).
        codes: ``[K, T]`` or ``[B, K, T]`` integer codes, undelayed (what
            ``UnifiedVoice.generate_codes`` returns, cut to a row's length), the first K
            codebooks of the codec.
        n_codebooks_ok: allow K below the codec's codebook count. DAC's ``from_codes`` then sums
            only the K given, as if the finer residual codebooks were zero; that is a muffled
            approximation, so it is refused unless asked for, and logged when it happens.

    Returns:
        float32 audio at ``model.sample_rate`` on the model's device: ``[T * hop]`` for ``[K, T]``
        codes, ``[B, T * hop]`` for a batch.

    Raises:
        ValueError: a shape other than ``[K, T]`` / ``[B, K, T]``, more codebooks than the codec
            has, fewer without ``n_codebooks_ok``, or a code outside ``[0, codebook_size)``.
    """
    if codes.ndim not in (2, 3) or codes.is_floating_point():
        raise ValueError(f"decode_codes: expected integer codes [K, T] or [B, K, T], got {codes.dtype} {tuple(codes.shape)}")
    batch = codes if codes.ndim == 3 else codes[None]
    have, size = int(model.n_codebooks), int(model.codebook_size)
    k = batch.shape[1]
    if k > have:
        raise ValueError(f"decode_codes: {k} codebooks given, the codec has {have}; were these codes made by another codec?")
    if k < have:
        if not n_codebooks_ok:
            raise ValueError(
                f"decode_codes: {k} of the codec's {have} codebooks given; decoding would treat the other {have - k} "
                "as zero (a muffled approximation). Pass n_codebooks_ok=True if that is what you want."
            )
        print(f"decode_codes: decoding {k} of {have} codebooks; codebooks {k}..{have - 1} contribute nothing",
              file=sys.stderr)
    if batch.numel() and (int(batch.min()) < 0 or int(batch.max()) >= size):
        raise ValueError(
            f"decode_codes: codes must lie in [0, {size}), got {int(batch.min())}..{int(batch.max())} "
            "(start/stop ids are not codes: cut each row to its length)"
        )
    device = next(model.parameters()).device
    with exact_fp32():
        z, *_ = model.quantizer.from_codes(batch.to(device=device, dtype=torch.long))
        audio = model.decode(z)  # (B, 1, T * hop)
    audio = audio[:, 0].float()
    return audio if codes.ndim == 3 else audio[0]


def make_demo_codec(output: str | Path, seed: int = 0, sample_rate: int = 16000) -> Path:
    """Write the demo's tiny randomly initialised DAC through DAC's own ``save``.

    The file is DAC's weights format (``save(package=False)``: kwargs + state dict), so the
    loading code that reads it is the one that reads official weights. The same seed gives the
    same bytes: the model is built under a fixed seed on the CPU and saved to an in-memory
    buffer (``torch.save`` names the zip folder after a file's name, which would otherwise be the
    random temporary name).

    Args:
        output: where the ``.pth`` goes (written atomically).
        seed: torch seed for the random initialisation.
        sample_rate: the codec's rate in Hz.

    Returns:
        ``output`` as a Path.
    """
    dac = _import_dac()
    kwargs = {**DEMO_CODEC_KWARGS, "sample_rate": int(sample_rate)}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model = dac.DAC(**kwargs)
    buf = io.BytesIO()
    model.save(buf, package=False)
    with atomic_path(output) as tmp:
        tmp.write_bytes(buf.getvalue())
    return Path(output)

