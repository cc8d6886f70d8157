"""UnifiedVoice: IndexTTS2's autoregressive text-to-codes model, with the released parameter names.

GPT input sequence for one utterance (the original's layout)::

    [ speaker latents + emo_vec (N) | speed_emb(s) | speed_emb(0) ]       prefix, N + 2 positions
    [ start_text, t_1 .. t_n, stop_text, stop_text (padding) ... ]      text, Lt + 2 positions
    [ start_mel,  c_1 .. c_m, stop_mel,  stop_mel  (padding) ... ]      codes, T + 2 positions

Text and codes each carry their own learned position table starting at 0; the trunk has no
positions of its own. Targets are the inputs shifted left (``t_1 .. t_n, stop_text``; ``c_1 ..
c_m, stop_mel``); a target is real (counted in the loss) up to and including the first stop.
The original fills padding with the stop token and feeds it through the trunk; we do the same,
so padded *values* never matter, but the losses here count real targets only.

``emo_vec`` is ``emo_layer(emovec_layer(emotion perceiver))``, the vector added to every speaker
latent; stage 2 puts the gradient-reversed speaker classifier on it.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
import torch.nn as nn

from indextts.model.config import ModelConfig
from indextts.model.conformer import ConformerEncoder
from indextts.model.gpt2 import GPT2, KVCache
from indextts.model.losses import masked_cross_entropy
from indextts.model.perceiver import PerceiverResampler


@dataclass
class ModelOutput:
    """What :meth:`UnifiedVoice.forward` returns. Logits are ``[B, L, V]``."""

    loss: torch.Tensor  # text_loss_weight * text_loss + mel_loss_weight * mel_loss
    text_loss: torch.Tensor  # mean CE over real text targets
    mel_loss: torch.Tensor  # mean CE over real code targets
    text_logits: torch.Tensor  # [B, Lt + 2, number_text_tokens + 1]
    mel_logits: torch.Tensor  # [B, T + 2, number_mel_codes]
    emo_vec: torch.Tensor  # [B, emo_dim]
    n_text_tokens: torch.Tensor  # real text targets in the batch (long scalar)
    n_mel_tokens: torch.Tensor  # real code targets in the batch (long scalar)
    text_targets: torch.Tensor  # [B, Lt + 2]
    text_mask: torch.Tensor  # [B, Lt + 2] bool, True = real target
    mel_targets: torch.Tensor  # [B, T + 2]
    mel_mask: torch.Tensor  # [B, T + 2]


class LearnedPositionEmbeddings(nn.Module):
    """A learned table; positions 0..L-1 for a segment of length L (parameter ``emb``)."""

    def __init__(self, seq_len: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)  # GPT-2's scheme

    def forward(self, length: int, device: torch.device, offset: int = 0) -> torch.Tensor:
        return self.emb(torch.arange(offset, offset + length, device=device))  # (L, dim)


def _aligned(ids: torch.Tensor, lengths: torch.Tensor, start: int, stop: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The original's ``set_*_padding`` + ``F.pad(stop)`` + ``build_aligned_inputs_and_targets``.

    Returns inputs ``[start, x_1..x_n, stop, stop...]``, targets ``[x_1..x_n, stop, stop...]``
    (both ``[B, L + 2]``) and the mask of real targets (positions ``0..n``).
    """
    B, L = ids.shape
    pos = torch.arange(L + 2, device=ids.device)[None, :]  # (1, L + 2)
    body = torch.where(pos[:, :L] < lengths[:, None], ids, torch.full_like(ids, stop))
    body = torch.cat([body, ids.new_full((B, 1), stop)], dim=1)  # (B, L + 1)
    inputs = torch.cat([ids.new_full((B, 1), start), body], dim=1)  # (B, L + 2)
    targets = torch.cat([body, ids.new_full((B, 1), stop)], dim=1)  # (B, L + 2)
    mask = pos <= lengths[:, None]
    return inputs, targets, mask


class UnifiedVoice(nn.Module):
    """The IndexTTS2 GPT with both conditioners. Build it with :func:`build_model`.

    Submodules (and so state-dict keys) are exactly the released ``gpt.pth``'s, see
    ``shared/reference/indextts2_gpt_state_dict.tsv``; the only layout difference is that
    ``gpt.h.N`` projection weights are ``nn.Linear`` ``[out, in]`` (see ``gpt2.is_conv1d_weight``).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.model_dim
        self.conditioning_encoder = ConformerEncoder(
            cfg.cond_feat_dim, cfg.cond_output_size, cfg.cond_attention_heads, cfg.cond_linear_units,
            cfg.cond_num_blocks, cfg.conv_kernel_size, cfg.pos_enc_max_len)
        self.perceiver_encoder = PerceiverResampler(
            d, dim_context=cfg.cond_output_size, num_latents=cfg.condition_num_latent,
            heads=cfg.cond_attention_heads, ff_mult=cfg.cond_perceiver_mult, depth=cfg.perceiver_depth,
            dim_head=cfg.perceiver_dim_head)
        self.emo_conditioning_encoder = ConformerEncoder(
            cfg.cond_feat_dim, cfg.emo_output_size, cfg.emo_attention_heads, cfg.emo_linear_units,
            cfg.emo_num_blocks, cfg.conv_kernel_size, cfg.pos_enc_max_len)
        self.emo_perceiver_encoder = PerceiverResampler(
            cfg.emo_perceiver_dim, dim_context=cfg.emo_output_size, num_latents=1,
            heads=cfg.emo_attention_heads, ff_mult=cfg.emo_perceiver_mult, depth=cfg.perceiver_depth,
            dim_head=cfg.perceiver_dim_head)
        self.text_embedding = nn.Embedding(cfg.text_vocab_size, d)
        self.emo_layer = nn.Linear(d, d)
        self.emovec_layer = nn.Linear(cfg.emo_perceiver_dim, d)
        self.mel_embedding = nn.Embedding(cfg.number_mel_codes, d)
        self.gpt = GPT2(d, cfg.layers, cfg.heads, cfg.dropout)
        self.mel_pos_embedding = LearnedPositionEmbeddings(cfg.mel_positions, d)
        self.text_pos_embedding = LearnedPositionEmbeddings(cfg.text_positions, d)
        self.final_norm = nn.LayerNorm(d)
        self.text_head = nn.Linear(d, cfg.text_vocab_size)
        self.mel_head = nn.Linear(d, cfg.number_mel_codes)
        # Two duration slots; the original initialises them to zero (normal with std 0).
        self.speed_emb = nn.Embedding(2, d)
        nn.init.zeros_(self.speed_emb.weight)
        for emb in (self.text_embedding, self.mel_embedding):
            nn.init.normal_(emb.weight, std=0.02)

    # --- conditioning ------------------------------------------------------------------------

    def get_conditioning(self, cond_feats: torch.Tensor, cond_lengths: torch.Tensor) -> torch.Tensor:
        """Speaker latents ``[B, condition_num_latent, model_dim]`` from features ``[B, T_c, cond_feat_dim]``."""
        x, mask = self.conditioning_encoder(cond_feats, cond_lengths)  # (B, T', c), (B, T')
        return self.perceiver_encoder(x, mask)

    def get_emo_vec(self, emo_feats: torch.Tensor, emo_lengths: torch.Tensor) -> torch.Tensor:
        """``emo_vec [B, emo_dim]`` from features ``[B, T_e, cond_feat_dim]``."""
        x, mask = self.emo_conditioning_encoder(emo_feats, emo_lengths)
        e = self.emo_perceiver_encoder(x, mask).squeeze(1)  # (B, emo_perceiver_dim)
        return self.emo_layer(self.emovec_layer(e))

    def build_prefix(self, cond_latents: torch.Tensor, emo_vec: torch.Tensor,
                     speed: torch.Tensor | None = None) -> torch.Tensor:
        """``[speaker latents + emo_vec, speed_emb(speed), speed_emb(0)]``: ``[B, N + 2, D]``.

        ``speed`` (long ``[B]``) picks the first duration slot's row; None means 1, which is what
        the original's training and inference always use.
        """
        B = cond_latents.shape[0]
        if speed is None:
            speed = torch.ones(B, dtype=torch.long, device=cond_latents.device)
        first = self.speed_emb(speed)
        second = self.speed_emb(torch.zeros_like(speed))
        return torch.cat([cond_latents + emo_vec.unsqueeze(1), first.unsqueeze(1), second.unsqueeze(1)], dim=1)

    def prepare_text(self, text_ids: torch.Tensor, text_lengths: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Text inputs, targets and real-target mask, each ``[B, Lt + 2]`` (see module doc)."""
        return _aligned(text_ids, text_lengths, self.cfg.start_text_token, self.cfg.stop_text_token)

    def prepare_codes(self, codes: torch.Tensor, code_lengths: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Code inputs, targets and real-target mask, each ``[B, T + 2]`` (see module doc)."""
        return _aligned(codes, code_lengths, self.cfg.start_mel_token, self.cfg.stop_mel_token)

    # --- training forward --------------------------------------------------------------------

    def _check(self, text_ids: torch.Tensor, text_lengths: torch.Tensor, codes: torch.Tensor,
               code_lengths: torch.Tensor, cond_feats: torch.Tensor, cond_lengths: torch.Tensor) -> None:
        cfg = self.cfg
        B = text_ids.shape[0]
        problems = []
        if text_ids.ndim != 2 or codes.ndim != 2:
            problems.append(f"text_ids and codes must be [B, L] (one codebook), got {tuple(text_ids.shape)} "
                            f"and {tuple(codes.shape)}")
        if cond_feats.ndim != 3 or cond_feats.shape[-1] != cfg.cond_feat_dim:
            problems.append(f"cond_feats must be [B, T_c, {cfg.cond_feat_dim}] (time before features), "
                            f"got {tuple(cond_feats.shape)}")
        for name, t in (("text_lengths", text_lengths), ("code_lengths", code_lengths), ("cond_lengths", cond_lengths),
                        ("codes", codes), ("cond_feats", cond_feats)):
            if t.shape[0] != B:
                problems.append(f"{name} has batch size {t.shape[0]}, text_ids has {B}")
        if text_ids.ndim == 2 and text_ids.shape[1] > cfg.max_text_tokens:
            problems.append(f"text has {text_ids.shape[1]} tokens, max_text_tokens is {cfg.max_text_tokens}")
        if codes.ndim == 2 and codes.shape[1] > cfg.max_mel_tokens:
            problems.append(f"codes have {codes.shape[1]} frames, max_mel_tokens is {cfg.max_mel_tokens}")
        # Value checks would force a device sync on GPU; the data pipeline checks there.
        if not problems and not text_ids.is_cuda:
            if int(cond_lengths.min()) < 3:
                problems.append("every cond_lengths entry must be at least 3 frames")
            if text_ids.numel() and int(text_ids.max()) >= cfg.text_vocab_size:
                problems.append(f"text id {int(text_ids.max())} >= text vocabulary {cfg.text_vocab_size}")
            if codes.numel() and int(codes.max()) >= cfg.number_mel_codes:
                problems.append(f"code {int(codes.max())} >= mel vocabulary {cfg.number_mel_codes}")
            if int(text_lengths.max()) > text_ids.shape[1] or int(code_lengths.max()) > codes.shape[1]:
                problems.append("a length exceeds its padded tensor's width")
        if problems:
            raise ValueError("UnifiedVoice.forward: " + "; ".join(problems))

    def forward(
        self,
        text_ids: torch.Tensor,
        text_lengths: torch.Tensor,
        codes: torch.Tensor,
        code_lengths: torch.Tensor,
        cond_feats: torch.Tensor,
        cond_lengths: torch.Tensor,
        emo_feats: torch.Tensor | None = None,
        emo_lengths: torch.Tensor | None = None,
        speed: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Teacher-forced forward pass with losses.

        Args:
            text_ids: ``[B, Lt]`` long, padded, *without* start/stop (added here).
            text_lengths: ``[B]`` real text tokens per row.
            codes: ``[B, T]`` long, the first codebook, padded, without start/stop.
            code_lengths: ``[B]`` real frames per row.
            cond_feats: ``[B, T_c, cond_feat_dim]`` speaker-reference features (time first).
            cond_lengths: ``[B]`` real feature frames (at least 3).
            emo_feats / emo_lengths: emotion-reference features; default to the speaker ones.
            speed: ``[B]`` long ids for the first duration slot (default 1, see build_prefix).

        Returns:
            :class:`ModelOutput`.

        Raises:
            ValueError: inconsistent shapes, sequences longer than the position tables, or (for
                CPU tensors) ids outside the vocabularies.
        """
        if codes.ndim == 3 and codes.shape[1] == 1:  # [B, 1, T]: one codebook (the data layout)
            codes = codes[:, 0]
        self._check(text_ids, text_lengths, codes, code_lengths, cond_feats, cond_lengths)
        if emo_feats is None:
            emo_feats, emo_lengths = cond_feats, cond_lengths
        elif emo_lengths is None:
            raise ValueError("UnifiedVoice.forward: emo_feats given without emo_lengths")
        cfg = self.cfg
        cond = self.get_conditioning(cond_feats, cond_lengths)  # (B, N, D)
        emo_vec = self.get_emo_vec(emo_feats, emo_lengths)  # (B, D)
        prefix = self.build_prefix(cond, emo_vec, speed)  # (B, N + 2, D)

        text_in, text_tgt, text_mask = self.prepare_text(text_ids, text_lengths)  # (B, Lt + 2)
        mel_in, mel_tgt, mel_mask = self.prepare_codes(codes, code_lengths)  # (B, T + 2)
        dev = text_ids.device
        text_emb = self.text_embedding(text_in) + self.text_pos_embedding(text_in.shape[1], dev)
        mel_emb = self.mel_embedding(mel_in) + self.mel_pos_embedding(mel_in.shape[1], dev)

        h = self.gpt(torch.cat([prefix, text_emb, mel_emb], dim=1))  # (B, N + 2 + Lt + 2 + T + 2, D)
        h = self.final_norm(h[:, prefix.shape[1]:])
        n_text = text_in.shape[1]
        text_logits = self.text_head(h[:, :n_text])  # (B, Lt + 2, Vt)
        mel_logits = self.mel_head(h[:, n_text:])  # (B, T + 2, Vm)

        text_loss = masked_cross_entropy(text_logits, text_tgt, text_mask)
        mel_loss = masked_cross_entropy(mel_logits, mel_tgt, mel_mask)
        loss = cfg.text_loss_weight * text_loss + cfg.mel_loss_weight * mel_loss
        return ModelOutput(
            loss=loss, text_loss=text_loss, mel_loss=mel_loss, text_logits=text_logits, mel_logits=mel_logits,
            emo_vec=emo_vec, n_text_tokens=text_mask.sum(), n_mel_tokens=mel_mask.sum(),
            text_targets=text_tgt, text_mask=text_mask, mel_targets=mel_tgt, mel_mask=mel_mask,
        )

    # --- inference ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate_codes(
        self,
        text_ids: torch.Tensor,
        cond_feats: torch.Tensor,
        cond_lengths: torch.Tensor,
        emo_feats: torch.Tensor | None = None,
        emo_lengths: torch.Tensor | None = None,
        *,
        emo_vec: torch.Tensor | None = None,
        max_new_tokens: int | None = None,
        temperature: float = 1.0,
        top_k: int = 0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample codes autoregressively with a KV cache.

        Args:
            text_ids: ``[B, Lt]`` text without start/stop; every row must be full length (no
                padding: batch utterances of equal token count, or call once per utterance).
            cond_feats, cond_lengths, emo_feats, emo_lengths: as in :meth:`forward`.
            emo_vec: use this ``[B, emo_dim]`` instead of computing it from emo_feats.
            max_new_tokens: cap on generated codes (default: max_mel_tokens).
            temperature: 0 means greedy.
            top_k: keep the k most likely codes (0 = all).
            generator: RNG for sampling.

        Returns:
            codes ``[B, T_max]`` (stop and beyond filled with stop_mel_token) and lengths ``[B]``.
            Codes at position k use mel position k + 1, as in training (the original's HF
            inference shifts generated codes one position further).
        """
        cfg = self.cfg
        B, Lt = text_ids.shape
        dev = text_ids.device
        if emo_vec is None:
            if emo_feats is None:
                emo_feats, emo_lengths = cond_feats, cond_lengths
            elif emo_lengths is None:
                raise ValueError("generate_codes: emo_feats given without emo_lengths")
            emo_vec = self.get_emo_vec(emo_feats, emo_lengths)
        prefix = self.build_prefix(self.get_conditioning(cond_feats, cond_lengths), emo_vec)
        lengths = torch.full((B,), Lt, dtype=torch.long, device=dev)
        text_in, _, _ = self.prepare_text(text_ids, lengths)  # [start, t_1..t_n, stop]
        text_emb = self.text_embedding(text_in) + self.text_pos_embedding(text_in.shape[1], dev)
        limit = min(max_new_tokens or cfg.max_mel_tokens, cfg.mel_positions - 1)
        token = torch.full((B, 1), cfg.start_mel_token, dtype=torch.long, device=dev)
        x = torch.cat([prefix, text_emb, self.mel_embedding(token) + self.mel_pos_embedding(1, dev)], dim=1)
        cache = KVCache(cfg.layers)
        out = torch.full((B, limit), cfg.stop_mel_token, dtype=torch.long, device=dev)
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        out_len = torch.full((B,), limit, dtype=torch.long, device=dev)
        for step in range(limit):
            h = self.final_norm(self.gpt(x, cache)[:, -1])
            logits = self.mel_head(h).float()  # (B, Vm)
            if temperature <= 0:
                nxt = logits.argmax(-1)
            else:
                logits = logits / temperature
                if top_k > 0:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(1)
            nxt = torch.where(done, torch.full_like(nxt, cfg.stop_mel_token), nxt)
            newly = (nxt == cfg.stop_mel_token) & ~done
            out_len = torch.where(newly, torch.full_like(out_len, step), out_len)
            done |= newly
            out[:, step] = nxt
            if bool(done.all()):
                break
            x = self.mel_embedding(nxt[:, None]) + self.mel_pos_embedding(1, dev, offset=step + 1)
        return out[:, : int(out_len.max())], out_len


def build_model(cfg: ModelConfig) -> UnifiedVoice:
    """Build a freshly initialised :class:`UnifiedVoice` for ``cfg`` (on the current default
    device: wrap in ``with torch.device("meta"):`` to get shapes without allocating)."""
    return UnifiedVoice(cfg)


# --- stage 2 pieces and freezing ------------------------------------------------------------------


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lambda_: float) -> torch.Tensor:  # type: ignore[override]
        ctx.lambda_ = lambda_
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return -ctx.lambda_ * grad, None


class GradientReversal(nn.Module):
    """Identity forward; multiplies the gradient by ``-lambda_`` backward (Ganin & Lempitsky).

    Set ``grl.lambda_`` each step to follow a schedule; it is a plain float, not a parameter.
    """

    def __init__(self, lambda_: float = 1.0) -> None:
        super().__init__()
        self.lambda_ = float(lambda_)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReverseGrad.apply(x, self.lambda_)

    def extra_repr(self) -> str:
        return f"lambda_={self.lambda_}"


class SpeakerClassifier(nn.Module):
    """MLP ``emo_dim -> hidden -> hidden -> n_speakers`` with ReLU and dropout, on ``emo_vec``.

    Returns logits ``[B, n_speakers]``. Not part of the exported ``gpt.pth``.
    """

    def __init__(self, emo_dim: int, n_speakers: int, hidden: int = 512, dropout: float = 0.3) -> None:
        super().__init__()
        if n_speakers < 2:
            raise ValueError(f"SpeakerClassifier needs at least 2 speakers, got {n_speakers}")
        self.net = nn.Sequential(
            nn.Linear(emo_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, n_speakers),
        )

    def forward(self, emo_vec: torch.Tensor) -> torch.Tensor:
        return self.net(emo_vec)


def set_trainable(model: nn.Module, patterns: list[str] | tuple[str, ...]) -> tuple[int, int]:
    """Make exactly the parameters whose names match a glob in ``patterns`` trainable.

    Args:
        model: any module; names are ``model.named_parameters()`` names, e.g.
            ``"gpt.*"``, ``"emo_*"``, ``"*"`` (everything).
        patterns: fnmatch globs; every other parameter gets ``requires_grad=False``.

    Returns:
        ``(trainable, total)`` parameter element counts.

    Raises:
        ValueError: a pattern matches no parameter (a typo would otherwise freeze silently).
    """
    names = [n for n, _ in model.named_parameters()]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise ValueError(f"set_trainable: pattern(s) {unmatched} match no parameter "
                         f"(top-level modules: {sorted({n.split('.')[0] for n in names})})")
    trainable = total = 0
    for name, p in model.named_parameters():
        on = any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
        p.requires_grad_(on)
        total += p.numel()
        trainable += p.numel() if on else 0
    return trainable, total
