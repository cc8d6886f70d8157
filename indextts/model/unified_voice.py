"""UnifiedVoice: IndexTTS2's autoregressive text-to-codes model, with the released parameter names.

GPT input sequence for one utterance (the original's layout)::

    [ speaker latents + emo_vec (N) | speed_emb(s) | speed_emb(0) ]       prefix, N + 2 positions
    [ start_text, t_1 .. t_n, stop_text, stop_text (padding) ... ]      text, Lt + 2 positions
    [ start_mel,  c_1 .. c_m, stop_mel,  stop_mel  (padding) ... ]      codes, T + 2 positions

With ``n_codebooks = K > 1`` (DAC's residual codebooks) the code segment is in the delay pattern
(:mod:`indextts.model.delay`): codebook k's sequence ``[start, c_1 .. c_m, stop ...]`` is shifted
right by k steps, the k steps it opens in front hold ``start`` and those it opens behind hold
``stop``, so the segment is ``T + K + 1`` positions long; each position's input is the sum of the
K codebooks' embeddings and K heads predict the next column. With K = 1 it is the layout above.

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
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from indextts.model.config import ModelConfig
from indextts.model.conformer import ConformerEncoder
from indextts.model.delay import delay
from indextts.model.gpt2 import GPT2, KVCache
from indextts.model.losses import codebook_cross_entropy, masked_cross_entropy
from indextts.model.perceiver import PerceiverResampler


@dataclass
class ModelOutput:
    """What :meth:`UnifiedVoice.forward` returns.

    Code tensors follow the layout the codes came in: ``[B, T]`` codes (one codebook) give
    ``mel_logits [B, T + 2, V]`` and ``[B, T + 2]`` targets/mask as in IndexTTS2; ``[B, K, T]``
    codes give ``mel_logits [B, K, L, V]`` and ``[B, K, L]`` targets/mask in the delay pattern,
    ``L = T + K + 1``.
    """

    loss: torch.Tensor  # text_loss_weight * text_loss + mel_loss_weight * mel_loss
    text_loss: torch.Tensor  # mean CE over real text targets
    mel_loss: torch.Tensor  # mean of mel_losses over the codebooks
    text_logits: torch.Tensor  # [B, Lt + 2, number_text_tokens + 1]
    mel_logits: torch.Tensor  # [B, T + 2, V] or [B, K, L, V] (see above)
    emo_vec: torch.Tensor  # [B, emo_dim]
    n_text_tokens: torch.Tensor  # real text targets in the batch (long scalar)
    n_mel_tokens: torch.Tensor  # real code steps (frames + stop) per codebook in the batch (long scalar)
    text_targets: torch.Tensor  # [B, Lt + 2]
    text_mask: torch.Tensor  # [B, Lt + 2] bool, True = real target
    mel_targets: torch.Tensor  # [B, T + 2] or [B, K, L]
    mel_mask: torch.Tensor  # [B, T + 2] or [B, K, L]
    mel_losses: torch.Tensor | None = None  # [K]: each codebook's mean CE over its real targets (not detached)


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
        # Codebooks 1..K-1 of the delay pattern, created last so that everything a one-codebook
        # model has is initialised exactly as in that model (same seed, same weights).
        if cfg.n_codebooks > 1:
            names = [f"cb{k}" for k in range(1, cfg.n_codebooks)]
            self.extra_mel_embedding = nn.ModuleDict({n: nn.Embedding(cfg.number_mel_codes, d) for n in names})
            self.extra_mel_head = nn.ModuleDict({n: nn.Linear(d, cfg.number_mel_codes) for n in names})
            for emb in self.extra_mel_embedding.values():
                nn.init.normal_(emb.weight, std=0.02)

    # --- codebooks ---------------------------------------------------------------------------

    def embed_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Sum of the K codebooks' embeddings: ids ``[B, K, L]`` -> ``[B, L, D]``."""
        x = self.mel_embedding(ids[:, 0])
        for k in range(1, ids.shape[1]):
            x = x + self.extra_mel_embedding[f"cb{k}"](ids[:, k])
        return x

    def code_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The K heads side by side: hidden ``[..., D]`` -> logits ``[..., K, V]``.

        Each head runs as its own module (so wrappers such as peft's modules_to_save see their
        forward), and the K outputs are stacked once.
        """
        if self.cfg.n_codebooks == 1:
            return self.mel_head(h).unsqueeze(-2)
        return torch.stack([self.mel_head(h), *(head(h) for head in self.extra_mel_head.values())], dim=-2)

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
        """Code inputs, targets and real-target mask in the delay pattern (see module doc).

        Args:
            codes: ``[B, K, T]`` (or ``[B, T]`` for one codebook), padding values arbitrary.
            code_lengths: ``[B]`` real frames per row.

        Returns:
            Each ``[B, K, T + K + 1]`` (``[B, T + 2]`` for ``[B, T]`` codes). Codebook k's
            targets are real from step k (its first code) to step k + m (its stop).
        """
        if codes.ndim == 2:
            return tuple(t[:, 0] for t in self.prepare_codes(codes[:, None], code_lengths))
        start, stop = self.cfg.start_mel_token, self.cfg.stop_mel_token
        B, K, T = codes.shape
        n = code_lengths[:, None, None]
        pos = torch.arange(T + 3, device=codes.device)[None, None, :]  # (1, 1, T + 3)
        body = torch.where(pos[..., 1 : T + 1] <= n, codes, torch.full_like(codes, stop))
        # One undelayed stream per codebook: [start, c_1 .. c_m, stop, stop ...], T + 3 long;
        # inputs are its first T + 2 steps and targets its last T + 2, as in _aligned.
        seq = torch.cat([codes.new_full((B, K, 1), start), body, codes.new_full((B, K, 2), stop)], dim=2)
        real = (pos >= 1) & (pos <= n + 1)  # c_1 .. c_m and the stop are targets
        seq, real = delay(seq, start, stop), delay(real.expand(B, K, T + 3), False)
        return seq[..., :-1], seq[..., 1:], real[..., 1:]

    # --- training forward --------------------------------------------------------------------

    def _check(self, text_ids: torch.Tensor, text_lengths: torch.Tensor, codes: torch.Tensor,
               code_lengths: torch.Tensor, cond_feats: torch.Tensor, cond_lengths: torch.Tensor) -> None:
        cfg = self.cfg
        B = text_ids.shape[0]
        problems = []
        K = cfg.n_codebooks
        if text_ids.ndim != 2:
            problems.append(f"text_ids must be [B, Lt], got {tuple(text_ids.shape)}")
        if not (codes.ndim == 3 and codes.shape[1] == K) and not (codes.ndim == 2 and K == 1):
            problems.append(f"codes must be [B, {K}, T] (model.n_codebooks = {K})"
                            f"{' or [B, T]' if K == 1 else ''}, got {tuple(codes.shape)}")
        if cond_feats.ndim != 3 or cond_feats.shape[-1] != cfg.cond_feat_dim:
            problems.append(f"cond_feats must be [B, T_c, {cfg.cond_feat_dim}] (time before features), "
                            f"got {tuple(cond_feats.shape)}")
        for name, t in (("text_lengths", text_lengths), ("code_lengths", code_lengths), ("cond_lengths", cond_lengths),
                        ("codes", codes), ("cond_feats", cond_feats)):
            if t.shape[0] != B:
                problems.append(f"{name} has batch size {t.shape[0]}, text_ids has {B}")
        if text_ids.ndim == 2 and text_ids.shape[1] > cfg.max_text_tokens:
            problems.append(f"text has {text_ids.shape[1]} tokens, max_text_tokens is {cfg.max_text_tokens}")
        if codes.ndim in (2, 3) and codes.shape[-1] > cfg.max_code_frames:
            problems.append(f"codes have {codes.shape[-1]} frames, the mel position table holds {cfg.max_code_frames} "
                            f"(max_mel_tokens {cfg.max_mel_tokens} less {K - 1} delay steps)")
        # Value checks would force a device sync on GPU; the data pipeline checks there.
        if not problems and not text_ids.is_cuda:
            if int(cond_lengths.min()) < 3:
                problems.append("every cond_lengths entry must be at least 3 frames")
            if text_ids.numel() and int(text_ids.max()) >= cfg.text_vocab_size:
                problems.append(f"text id {int(text_ids.max())} >= text vocabulary {cfg.text_vocab_size}")
            if codes.numel() and int(codes.max()) >= cfg.number_mel_codes:
                problems.append(f"code {int(codes.max())} >= mel vocabulary {cfg.number_mel_codes}")
            if int(text_lengths.max()) > text_ids.shape[1] or int(code_lengths.max()) > codes.shape[-1]:
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
            codes: ``[B, K, T]`` long (K = ``n_codebooks``; ``[B, T]`` when K = 1), padded,
                undelayed, without start/stop (the delay pattern is built here).
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
        one_stream = codes.ndim == 2
        codes = codes[:, None] if one_stream else codes  # (B, K, T)
        mel_in, mel_tgt, mel_mask = self.prepare_codes(codes, code_lengths)  # (B, K, L), L = T + K + 1
        dev = text_ids.device
        text_emb = self.text_embedding(text_in) + self.text_pos_embedding(text_in.shape[1], dev)
        mel_emb = self.embed_codes(mel_in) + self.mel_pos_embedding(mel_in.shape[2], dev)

        h = self.gpt(torch.cat([prefix, text_emb, mel_emb], dim=1))  # (B, N + 2 + Lt + 2 + L, D)
        h = self.final_norm(h[:, prefix.shape[1]:])
        n_text = text_in.shape[1]
        text_logits = self.text_head(h[:, :n_text])  # (B, Lt + 2, Vt)
        logits = self.code_logits(h[:, n_text:])  # (B, L, K, Vm)

        text_loss = masked_cross_entropy(text_logits, text_tgt, text_mask)
        mel_losses = codebook_cross_entropy(logits, mel_tgt, mel_mask)  # (K,)
        mel_loss = mel_losses.mean()
        loss = cfg.text_loss_weight * text_loss + cfg.mel_loss_weight * mel_loss
        if one_stream:
            mel_logits, mel_tgt, mel_mask = logits[:, :, 0], mel_tgt[:, 0], mel_mask[:, 0]
            n_mel = mel_mask.sum()
        else:
            mel_logits = logits.transpose(1, 2)  # (B, K, L, Vm), a view
            n_mel = mel_mask[:, 0].sum()
        return ModelOutput(
            loss=loss, text_loss=text_loss, mel_loss=mel_loss, text_logits=text_logits, mel_logits=mel_logits,
            emo_vec=emo_vec, n_text_tokens=text_mask.sum(), n_mel_tokens=n_mel,
            text_targets=text_tgt, text_mask=text_mask, mel_targets=mel_tgt, mel_mask=mel_mask, mel_losses=mel_losses,
        )

    # --- inference ---------------------------------------------------------------------------

    def merge_emo_vec(self, cond_feats: torch.Tensor, cond_lengths: torch.Tensor, emo_feats: torch.Tensor,
                      emo_lengths: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """IndexTTS2's ``merge_emovec``: ``base + alpha * (emo - base)``, ``[B, emo_dim]``.

        ``base`` is the speaker prompt's own ``emo_vec`` and ``emo`` the emotion prompt's, so
        ``alpha = 1`` is the emotion prompt alone and ``alpha = 0`` the speaker prompt alone.
        """
        emo = self.get_emo_vec(emo_feats, emo_lengths)
        if alpha == 1.0:
            return emo
        base = self.get_emo_vec(cond_feats, cond_lengths)
        return base + alpha * (emo - base)

    def frame_limit(self, max_new_tokens: int | None = None) -> int:
        """Frames :meth:`generate_codes` generates at most: ``max_new_tokens`` capped by the
        longest utterance training covers (``max_code_frames``: the mel position table less the
        start, stop and delay steps). A row of this many frames did not reach its stop token."""
        return min(max_new_tokens or self.cfg.max_code_frames, self.cfg.max_code_frames)

    @torch.no_grad()
    def generate_codes(
        self,
        text_ids: torch.Tensor,
        cond_feats: torch.Tensor,
        cond_lengths: torch.Tensor,
        emo_feats: torch.Tensor | None = None,
        emo_lengths: torch.Tensor | None = None,
        *,
        text_lengths: torch.Tensor | None = None,
        emo_vec: torch.Tensor | None = None,
        emo_alpha: float = 1.0,
        max_new_tokens: int | None = None,
        min_new_tokens: int = 0,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        num_beams: int = 1,
        length_penalty: float = 1.0,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        use_cache: bool = True,
        on_step: Callable[[int, torch.Tensor], None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample codes autoregressively (all K codebooks, delay pattern) with a KV cache.

        At step ``s`` codebook k predicts frame ``s - k``. Codebook 0 decides the length: its
        ``stop`` ends the row, and codebook k > 0 then stops at the same frame, k steps later
        (it cannot stop earlier: its stop logit is masked). Before its first frame a codebook is
        fed ``start`` and after the row's end ``stop``, exactly as in training. ``start`` is never
        sampled as a code.

        Rows of different text lengths are left-padded: each row's sequence is exactly what it is
        alone (``[prefix, start, text, stop, codes ...]``, its own text and mel positions from 0),
        moved right, and the padding is hidden from attention, so a batch gives every row what it
        gets alone (up to float rounding).

        Logits are processed in the order of HF ``generate`` (which IndexTTS2's inference uses):
        repetition penalty, then temperature, top-k, top-p.

        Args:
            text_ids: ``[B, Lt]`` text without start/stop, padded on the right when rows differ.
            cond_feats, cond_lengths, emo_feats, emo_lengths: as in :meth:`forward`.
            text_lengths: ``[B]`` real tokens per row (default: every row ``Lt``).
            emo_vec: use this ``[B, emo_dim]`` instead of computing it from the prompts.
            emo_alpha: weight of the emotion prompt against the speaker prompt's own emotion
                (:meth:`merge_emo_vec`); used when ``emo_feats`` is given.
            max_new_tokens: cap on generated frames (default and maximum: :meth:`frame_limit`).
            min_new_tokens: frames before codebook 0 may stop.
            temperature: 0 means greedy; applied to each codebook's logits on its own.
            top_k: keep each codebook's k most likely ids (0 = all).
            top_p: keep each codebook's smallest set of ids whose probability reaches ``top_p``
                (1 = all).
            repetition_penalty: HF's CTRL-style penalty on the ids a row's codebook has already
                produced (a positive logit is divided by it, a negative one multiplied); 1 = off.
                Applied in greedy decoding too, as HF does.
            num_beams: more than 1 runs HF's beam search (temperature 0) or beam sampling
                (IndexTTS2's ``num_beams=3``), see :meth:`_beam_codes`; one code stream only.
            length_penalty: HF's: a finished hypothesis scores its summed log-probabilities
                divided by (its length, stop included) ** length_penalty; beams only.
            generator: RNG for sampling; one per row (a sequence of B) makes each row's draws
                independent of the batch it is in.
            use_cache: False recomputes the whole sequence at every step (a reference for the
                cache; same tokens, much slower).
            on_step: called as ``on_step(step, logits)`` with each step's raw logits
                ``[B, K, V]`` (float32, before any processing; with beams ``[B * num_beams, 1,
                V]``, the running beams row by row); for tests and diagnostics.

        Returns:
            Undelayed codes ``[B, K, T_max]`` (from each row's length on filled with
            stop_mel_token) and lengths ``[B]`` in frames; a length of :meth:`frame_limit` means
            the row stopped at the cap, not at its stop token. Frame ``t`` of codebook k is fed
            at mel position ``t + k + 1``, as in training (the original's HF inference shifts
            generated codes one position further).

        Raises:
            ValueError: inconsistent text lengths, generators or sampling settings.
        """
        cfg = self.cfg
        K, V = cfg.n_codebooks, cfg.number_mel_codes
        B, Lt = text_ids.shape
        dev = text_ids.device
        if text_lengths is None:
            text_lengths = torch.full((B,), Lt, dtype=torch.long, device=dev)
        elif text_lengths.shape != (B,) or int(text_lengths.min()) < 0 or int(text_lengths.max()) > Lt:
            raise ValueError(f"generate_codes: text_lengths must be [B={B}] in 0..{Lt}, got {text_lengths.tolist()}")
        if isinstance(generator, (list, tuple)) and len(generator) != B:
            raise ValueError(f"generate_codes: {len(generator)} generators for {B} rows")
        if not 0.0 < top_p <= 1.0 or repetition_penalty <= 0 or top_k < 0:
            raise ValueError(f"generate_codes: need 0 < top_p <= 1, repetition_penalty > 0, top_k >= 0; got "
                             f"top_p={top_p}, repetition_penalty={repetition_penalty}, top_k={top_k}")
        if emo_feats is not None and emo_lengths is None:
            raise ValueError("generate_codes: emo_feats given without emo_lengths")
        if num_beams < 1 or (num_beams > 1 and K != 1):
            raise ValueError(f"generate_codes: num_beams must be >= 1, and beams need one code stream (the delay "
                             f"pattern's {K} codebooks per step have no single-token beam); got num_beams={num_beams}")
        prefix = self._prompt_prefix(cond_feats, cond_lengths, emo_feats, emo_lengths, emo_vec, emo_alpha)
        text_lengths = text_lengths.to(dev)
        text_in, _, _ = self.prepare_text(text_ids, text_lengths)  # [start, t_1..t_n, stop, stop ...]
        text_emb = self.text_embedding(text_in) + self.text_pos_embedding(text_in.shape[1], dev)
        first = torch.cat([prefix, text_emb], dim=1)  # (B, P, D), shorter texts padded on the right
        P = first.shape[1]
        pad = Lt - text_lengths  # (B,)
        key_mask = None
        if bool((pad > 0).any()):
            # Move each row's padding to the front: row b becomes [pad_b junk | prefix, start, text, stop].
            src = (torch.arange(P, device=dev)[None, :] - pad[:, None]) % P  # (B, P)
            first = first.gather(1, src[:, :, None].expand(-1, -1, first.shape[2]))
            key_mask = torch.arange(P, device=dev)[None, :] >= pad[:, None]  # (B, P)
        limit = self.frame_limit(max_new_tokens)
        if num_beams > 1:
            return self._beam_codes(first, key_mask, limit, num_beams, length_penalty, min_new_tokens, temperature,
                                    top_k, top_p, repetition_penalty, generator, use_cache, on_step)
        start, stop = cfg.start_mel_token, cfg.stop_mel_token
        column = torch.full((B, K), start, dtype=torch.long, device=dev)  # the step's input, one id per codebook
        x = torch.cat([first, self.embed_codes(column[:, :, None]) + self.mel_pos_embedding(1, dev)], dim=1)
        if key_mask is not None:
            key_mask = torch.cat([key_mask, key_mask.new_ones(B, 1)], dim=1)
        cache = KVCache(cfg.layers) if use_cache else None
        seq = x
        out = torch.full((B, K, limit), stop, dtype=torch.long, device=dev)
        out_len = torch.full((B,), limit, dtype=torch.long, device=dev)
        known = torch.zeros(B, dtype=torch.bool, device=dev)  # codebook 0 has stopped (out_len is final)
        banned = torch.zeros(K, V, dtype=torch.bool, device=dev)
        banned[:, start] = True  # start is never a code
        banned[1:, stop] = True  # only codebook 0 ends a row
        seen = torch.zeros(B, K, V, dtype=torch.bool, device=dev) if repetition_penalty != 1.0 else None
        for step in range(limit + K - 1):
            h = self.gpt(x, cache, key_mask) if use_cache else self.gpt(seq, key_mask=key_mask)
            logits = self.code_logits(self.final_norm(h[:, -1])).float()  # (B, K, V)
            if on_step is not None:
                on_step(step, logits)
            logits = logits.masked_fill(banned, float("-inf"))
            if step < min_new_tokens:
                logits[:, 0, stop] = float("-inf")
            if seen is not None:
                logits = penalise_repeats(logits, seen, repetition_penalty)
            nxt = self._pick(logits, temperature, top_k, top_p, generator)
            # Codebook 0 is at frame `step`: a sampled stop fixes the row's length.
            if step < limit:
                newly = (nxt[:, 0] == stop) & ~known
                out_len = torch.where(newly, torch.full_like(out_len, step), out_len)
                known |= newly
            if step == limit - 1:
                known[:] = True  # rows without a stop end at the cap
            frame = step - torch.arange(K, device=dev)  # (K,): the frame each codebook is at
            live = (frame[None, :] >= 0) & (frame[None, :] < out_len[:, None])  # (B, K)
            nxt = torch.where(live, nxt, torch.where(frame[None, :] < 0, start, stop))
            if seen is not None:
                seen |= F.one_hot(nxt, V).bool() & live[:, :, None]
            for k in range(K):
                f = step - k
                if 0 <= f < limit:
                    out[:, k, f] = nxt[:, k]
            if bool((known & (step >= out_len + K - 2)).all()):
                break
            column = nxt
            x = self.embed_codes(column[:, :, None]) + self.mel_pos_embedding(1, dev, offset=step + 1)
            if key_mask is not None:
                key_mask = torch.cat([key_mask, key_mask.new_ones(B, 1)], dim=1)
            if not use_cache:
                seq = torch.cat([seq, x], dim=1)
        return out[:, :, : int(out_len.max())], out_len

    @torch.no_grad()
    def code_latents(self, text_ids: torch.Tensor, codes: torch.Tensor, cond_feats: torch.Tensor,
                     cond_lengths: torch.Tensor, emo_feats: torch.Tensor | None = None,
                     emo_lengths: torch.Tensor | None = None, *, emo_vec: torch.Tensor | None = None,
                     emo_alpha: float = 1.0) -> torch.Tensor:
        """The GPT latents IndexTTS2's s2mel reads for one utterance: ``[T, model_dim]``.

        The second, teacher-forced pass of ``infer_v2`` (``gpt(..., return_latent)``): the
        final-LayerNormed hidden states at the code inputs ``[start, c_0 .. c_{T-2}]``, i.e. the
        state that predicts each code ``c_0 .. c_{T-1}``, with the same prefix as generation.
        One stream (K = 1) only: these latents exist for the semantic codes.

        Args:
            text_ids: ``[1, Lt]`` text without start/stop.
            codes: ``[1, T]`` the utterance's codes (no start/stop), T >= 1.
            cond_feats, cond_lengths, emo_feats, emo_lengths, emo_vec, emo_alpha: as in
                :meth:`generate_codes`.
        """
        if self.cfg.n_codebooks != 1 or codes.ndim != 2 or codes.shape[0] != 1 or text_ids.shape[0] != 1:
            raise ValueError(f"code_latents: one row of one code stream, got codes {tuple(codes.shape)} for a "
                             f"{self.cfg.n_codebooks}-codebook model and text {tuple(text_ids.shape)}")
        dev = text_ids.device
        prefix = self._prompt_prefix(cond_feats, cond_lengths, emo_feats, emo_lengths, emo_vec, emo_alpha)
        text_in, _, _ = self.prepare_text(text_ids, torch.tensor([text_ids.shape[1]], device=dev))
        T = codes.shape[1]
        mel_in, _, _ = self.prepare_codes(codes[:, None], torch.tensor([T], device=dev))  # (1, 1, T + 2)
        text_emb = self.text_embedding(text_in) + self.text_pos_embedding(text_in.shape[1], dev)
        mel_emb = self.embed_codes(mel_in) + self.mel_pos_embedding(mel_in.shape[2], dev)
        h = self.final_norm(self.gpt(torch.cat([prefix, text_emb, mel_emb], dim=1)))
        start = prefix.shape[1] + text_in.shape[1]
        return h[0, start : start + T]

    def _prompt_prefix(self, cond_feats: torch.Tensor, cond_lengths: torch.Tensor, emo_feats: torch.Tensor | None,
                       emo_lengths: torch.Tensor | None, emo_vec: torch.Tensor | None, emo_alpha: float) -> torch.Tensor:
        """The conditioning prefix ``[B, N + 2, D]`` of generation. Prompts of different lengths are
        encoded one row at a time: the conformer's convolution module, like the original's, lets
        padding reach the last real frames (the pointwise conv's bias is not masked), so a padded
        prompt would condition a row differently from the same prompt alone."""
        ragged = [bool((n != f.shape[1]).any()) for f, n in ((cond_feats, cond_lengths), (emo_feats, emo_lengths))
                  if f is not None]
        if any(ragged):
            def row(f: torch.Tensor | None, n: torch.Tensor | None, b: int):
                return (None, None) if f is None else (f[b : b + 1, : int(n[b])], n[b : b + 1])

            rows = [self._prompt_prefix(*row(cond_feats, cond_lengths, b), *row(emo_feats, emo_lengths, b),
                                        None if emo_vec is None else emo_vec[b : b + 1], emo_alpha)
                    for b in range(cond_feats.shape[0])]
            return torch.cat(rows)
        if emo_vec is None:
            emo_vec = (self.get_emo_vec(cond_feats, cond_lengths) if emo_feats is None
                       else self.merge_emo_vec(cond_feats, cond_lengths, emo_feats, emo_lengths, emo_alpha))
        return self.build_prefix(self.get_conditioning(cond_feats, cond_lengths), emo_vec)

    def _beam_codes(self, first: torch.Tensor, key_mask: torch.Tensor | None, limit: int, num_beams: int,
                    length_penalty: float, min_new_tokens: int, temperature: float, top_k: int, top_p: float,
                    repetition_penalty: float, generator: torch.Generator | Sequence[torch.Generator] | None,
                    use_cache: bool, on_step: Callable[[int, torch.Tensor], None] | None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`generate_codes` with ``num_beams`` beams per row (one code stream): the beam
        search (temperature 0) and beam sampling of transformers' ``generate`` (``_beam_search``,
        ``early_stopping=False``), each row on its own.

        * A beam's step scores are the ``log_softmax`` of its logits, then the processors (start
          banned, stop banned before ``min_new_tokens``, the repetition penalty on what the beam
          produced), then when sampling the warpers (temperature, top-k, top-p, each keeping at
          least 2 ids); a continuation scores its beam's score plus its step score.
        * Of a row's ``num_beams * V`` continuations ``2 * num_beams`` candidates are taken: the
          best ones, or drawn without replacement with probabilities ``softmax(scores)`` over all
          of them. Beams other than 0 start at -1e9, so the first step branches from beam 0 only.
        * A candidate ending in stop, or reaching the frame limit, is finished: among the first
          ``num_beams`` candidates each becomes a hypothesis scored ``score / length **
          length_penalty`` (length: generated tokens, the stop included) and the row keeps its
          ``num_beams`` best hypotheses. The ``num_beams`` best unfinished candidates run on.
        * A row is done at the limit, or once its best running score over the current length **
          length_penalty is no better than the worst of a full set of hypotheses (HF's heuristic);
          a done row's hypotheses no longer change.

        Returns the best hypothesis per row: codes ``[B, 1, T]`` (stop from its length on) and
        lengths ``[B]`` (``limit`` for a hypothesis that reached the limit without a stop).
        """
        cfg = self.cfg
        V, nb, W = cfg.number_mel_codes, num_beams, 2 * num_beams
        start, stop = cfg.start_mel_token, cfg.stop_mel_token
        B, dev = first.shape[0], first.device
        N, NEG = B * nb, -1.0e9
        beam_row = torch.arange(B, device=dev).repeat_interleave(nb)  # (N,): the row of each beam
        x = torch.cat([first, self.embed_codes(first.new_full((B, 1, 1), start, dtype=torch.long))
                       + self.mel_pos_embedding(1, dev)], dim=1)
        row_mask = None if key_mask is None else torch.cat([key_mask, key_mask.new_ones(B, 1)], dim=1)
        key_mask = None if row_mask is None else row_mask[beam_row]
        cache = KVCache(cfg.layers) if use_cache else None
        seq = x[beam_row]
        run_codes = torch.full((B, nb, limit), stop, dtype=torch.long, device=dev)
        run_score = torch.full((B, nb), NEG, device=dev)
        run_score[:, 0] = 0.0
        hyp_codes, hyp_score = run_codes.clone(), torch.full((B, nb), NEG, device=dev)
        hyp_len = torch.full((B, nb), limit, dtype=torch.long, device=dev)
        hyp_real = torch.zeros(B, nb, dtype=torch.bool, device=dev)  # a slot holds a finished hypothesis
        undecided = torch.ones(B, dtype=torch.bool, device=dev)  # HF's is_early_stop_heuristic_unsatisfied
        first_ones = torch.arange(W, device=dev) < nb  # the candidates that may become hypotheses
        seen = torch.zeros(N, V, dtype=torch.bool, device=dev) if repetition_penalty != 1.0 else None
        for step in range(limit):
            if step == 0:  # the prompt once per row; its beams start as copies
                h = (self.gpt(x, cache, row_mask) if use_cache else self.gpt(x, key_mask=row_mask))[beam_row]
                if cache is not None:
                    cache.reorder(beam_row)
            else:
                h = self.gpt(x, cache, key_mask) if use_cache else self.gpt(seq, key_mask=key_mask)
            logits = self.code_logits(self.final_norm(h[:, -1])).float()  # (N, 1, V)
            if on_step is not None:
                on_step(step, logits)
            lp = torch.log_softmax(logits[:, 0], dim=-1)
            lp[:, start] = float("-inf")
            if step < min_new_tokens:
                lp[:, stop] = float("-inf")
            if seen is not None:
                lp = penalise_repeats(lp, seen, repetition_penalty)
            if temperature > 0:
                lp = warp_logits(lp, temperature, top_k, top_p, min_keep=2)
            scores = (lp.view(B, nb, V) + run_score[:, :, None]).view(B, nb * V)
            if temperature > 0:
                idx = self._draw_candidates(scores, W, generator, undecided)
                cand = scores.gather(1, idx)
            else:
                cand, idx = scores.topk(W, dim=1)
            parent, tok = idx // V, idx % V  # (B, W)
            codes = run_codes.gather(1, parent[:, :, None].expand(-1, -1, limit))
            codes[:, :, step] = tok
            ends = (tok == stop) | (step + 1 >= limit)
            # The best unfinished candidates run on (finished ones sink by -1e9, as in HF).
            live = cand + ends.float() * NEG
            keep = live.topk(nb, dim=1).indices  # (B, nb)
            run_score = live.gather(1, keep)
            run_codes = codes.gather(1, keep[:, :, None].expand(-1, -1, limit))
            beam = (parent.gather(1, keep) + torch.arange(B, device=dev)[:, None] * nb).view(N)
            nxt = tok.gather(1, keep).view(N)
            # Finished candidates among the first num_beams compete with the row's hypotheses.
            fin = ends & first_ones
            score = cand / float((step + 1) ** length_penalty)
            score = score + (~undecided[:, None]).float() * NEG + (~fin).float() * NEG
            merged = torch.cat([hyp_score, score], dim=1)
            best = merged.topk(nb, dim=1).indices
            hyp_score = merged.gather(1, best)
            hyp_codes = torch.cat([hyp_codes, codes], dim=1).gather(1, best[:, :, None].expand(-1, -1, limit))
            length = torch.where(tok == stop, step, step + 1)
            hyp_len = torch.cat([hyp_len, length], dim=1).gather(1, best)
            hyp_real = torch.cat([hyp_real, fin], dim=1).gather(1, best)
            # HF's heuristic: can the best running beam still beat the worst of a full set?
            hope = run_score[:, :1] / float((step + 1) ** length_penalty)
            worst = torch.where(hyp_real, hyp_score.min(dim=1, keepdim=True).values, NEG)
            undecided = undecided & (hope > worst).any(dim=1)
            if step + 1 >= limit or not bool(undecided.any()):
                break
            if seen is not None:
                seen = seen[beam]
                seen[torch.arange(N, device=dev), nxt] = True
            if cache is not None:
                cache.reorder(beam)
            x = self.embed_codes(nxt[:, None, None]) + self.mel_pos_embedding(1, dev, offset=step + 1)
            if not use_cache:
                seq = torch.cat([seq[beam], x], dim=1)
            if key_mask is not None:
                key_mask = torch.cat([key_mask, key_mask.new_ones(N, 1)], dim=1)
        lengths = hyp_len[:, 0]
        return hyp_codes[:, :1, : int(lengths.max())], lengths

    @staticmethod
    def _draw_candidates(scores: torch.Tensor, n: int, generator: torch.Generator | Sequence[torch.Generator] | None,
                         undecided: torch.Tensor) -> torch.Tensor:
        """Beam sampling's candidates: ``n`` indices per row of ``scores [B, C]`` drawn without
        replacement with probabilities ``softmax(scores)`` (HF's ``torch.multinomial``). With one
        generator per row, a row's draws use its own and decided rows (whose hypotheses are final)
        draw nothing; with one generator the whole batch draws at once, as HF does."""
        if isinstance(generator, (list, tuple)):
            idx = scores.topk(n, dim=1).indices
            for b, g in enumerate(generator):
                if bool(undecided[b]):
                    idx[b] = torch.multinomial(torch.softmax(scores[b], dim=-1), n, generator=g)
            return idx
        probs = torch.softmax(scores, dim=-1)
        probs = torch.where(undecided[:, None], probs, torch.ones_like(probs))  # a decided row may hold no finite score
        return torch.multinomial(probs, n, generator=generator)

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
              generator: torch.Generator | Sequence[torch.Generator] | None) -> torch.Tensor:
        """Next ids ``[B, K]`` from logits ``[B, K, V]``: greedy at temperature 0, else
        :func:`warp_logits` and a multinomial draw (one per row with one generator per row)."""
        if temperature <= 0:
            return logits.argmax(-1)
        B, K, V = logits.shape
        probs = torch.softmax(warp_logits(logits, temperature, top_k, top_p), -1)
        if isinstance(generator, (list, tuple)):
            return torch.stack([torch.multinomial(probs[b], 1, generator=g)[:, 0] for b, g in enumerate(generator)])
        return torch.multinomial(probs.view(B * K, V), 1, generator=generator).view(B, K)


def penalise_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF's ``RepetitionPenaltyLogitsProcessor`` on ``logits [..., V]`` for the ids marked in
    ``seen [..., V]``: a positive logit is divided by ``penalty``, a negative one multiplied."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def warp_logits(logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0,
                min_keep: int = 1) -> torch.Tensor:
    """HF's sampling warpers in HF's order on ``logits [..., V]``: temperature, top-k, top-p
    (removed ids get ``-inf``). ``temperature`` must be positive. ``min_keep`` is HF's
    ``min_tokens_to_keep`` (1; 2 in beam sampling)."""
    V = logits.shape[-1]
    logits = logits / temperature
    top_k = max(top_k, min_keep) if top_k > 0 else 0
    if 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # TopPLogitsWarper: drop the least likely ids whose summed probability stays within
        # 1 - top_p; the min_keep most likely ids always stay.
        ordered, order = torch.sort(logits, dim=-1)
        drop = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -min_keep:] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


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
