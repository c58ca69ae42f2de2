"""Keyword fusion: condition the ``[SEG]`` embeddings on the ``[KEY]`` embeddings (SPEC §2.4).

Four variants, chosen by :class:`keyseg.config.FusionConfig.variant`:

``reference``
    Exactly the reference module: the sample's ``n`` ``[SEG]`` rows are linearly
    interpolated to ``num_queries`` rows; cross-attention with Q from ``[SEG]`` and K/V from
    ``[KEY]``; output projection; single-head self-attention; interpolated back to ``n``.
    There is no residual path, so with a single ``[KEY]`` the softmax is over one key and
    every query row receives the same value: the output then does **not** depend on
    ``[SEG]`` at all (a quirk of the reference, kept for fidelity; see ``residual``).
``residual``
    ``x = norm(x + cross_attn(x, key))``, ``x = norm(x + self_attn(x))``,
    ``x = norm(x + mlp(x))`` — the LayerNorms/MLP the reference built but left unused
    (post-norm: every step renormalises the sum, so with one ``[KEY]``, whose
    cross-attention adds the same vector to every row, what tells two ``[SEG]`` rows apart
    shrinks at each step; on the shapes lab the prompts of a multi-target answer left it at
    mean cosine 0.92 from inputs at -0.05, 0.995 from 0.98: experiments/seg_prompts.py).
``gated``
    Pre-norm blocks on an untouched residual stream, each scaled by a learned
    ``tanh(gate)`` that starts at ``gate_init`` (default 0):
    ``x = x + tanh(g1) * cross_attn(norm(x), key)``,
    ``x = x + tanh(g2) * self_attn(norm(x))``, ``x = x + tanh(g3) * mlp(norm(x))``, on the
    ``n`` rows themselves (no resampling, which blends neighbouring rows). With gates at 0
    it starts as the identity (its blocks then get no gradient until the gates open, which
    on the shapes lab they hardly did); a difference between two ``[SEG]`` rows reaches
    SAM unchanged unless training learns to change it.
``none``
    ``[SEG]`` passes through unchanged (the no-``[KEY]`` ablation).

A sample with **zero** ``[KEY]`` rows has nothing to attend to: every variant returns its
``[SEG]`` rows unchanged (defined pass-through, never a zero vector fused silently).

Attention is computed in fp32 (as the reference does) and returned in the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from keyseg.config import FusionConfig


def resample_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Linearly interpolate ``x: (n, d)`` along the row axis to ``(rows, d)``."""
    if x.shape[0] == rows:
        return x
    # F.interpolate wants (batch, channels, length): rows are the length axis.
    return F.interpolate(x.t().unsqueeze(0), size=rows, mode="linear", align_corners=False)[
        0
    ].t()


def _linear_fp32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = layer.bias.float() if layer.bias is not None else None
    return F.linear(x, layer.weight.float(), bias)


class _Attention(nn.Module):
    """Single-head scaled dot-product attention with q/k/v/out projections, run in fp32.

    q/k/v map ``dim -> inner`` and out maps ``inner -> dim``; the scale is 1/sqrt(inner)."""

    def __init__(self, dim: int, inner: int | None = None) -> None:
        super().__init__()
        inner = inner or dim
        self.q_proj = nn.Linear(dim, inner)
        self.k_proj = nn.Linear(dim, inner)
        self.v_proj = nn.Linear(dim, inner)
        self.out_proj = nn.Linear(inner, dim)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``queries: (q, dim)``, ``context: (k, dim)``, both fp32 -> ``(q, dim)`` fp32."""
        q = _linear_fp32(self.q_proj, queries)
        k = _linear_fp32(self.k_proj, context)
        v = _linear_fp32(self.v_proj, context)
        weights = torch.softmax(q @ k.t() / math.sqrt(q.shape[-1]), dim=-1)
        return _linear_fp32(self.out_proj, weights @ v)


class KeywordFusion(nn.Module):
    """Fuse one sample's ``[KEY]`` embeddings into its ``[SEG]`` embeddings."""

    def __init__(self, config: FusionConfig | None = None) -> None:
        super().__init__()
        self.config = config or FusionConfig()
        dim = self.config.dim
        self.variant = self.config.variant
        if self.variant == "none":
            return
        self.cross_attn = _Attention(dim, self.config.inner_dim)
        self.self_attn = _Attention(dim)
        if self.variant in ("residual", "gated"):
            hidden = int(dim * self.config.mlp_ratio)
            self.norm_cross = nn.LayerNorm(dim)
            self.norm_self = nn.LayerNorm(dim)
            self.norm_mlp = nn.LayerNorm(dim)
            self.mlp = nn.Sequential(
                nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(self.config.dropout),
                nn.Linear(hidden, dim),
            )
        if self.variant == "gated":
            # (cross, self, mlp); gate_init 0 -> tanh(0) = 0: the module starts as the identity
            start = math.atanh(self.config.gate_init)
            self.gates = nn.Parameter(torch.full((3,), start))

    def forward(self, seg: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Return fused ``[SEG]`` embeddings.

        Args:
            seg: ``(n_seg, dim)`` ``[SEG]`` embeddings of one sample (``n_seg`` may be 0).
            key: ``(n_key, dim)`` ``[KEY]`` embeddings of the same sample (``n_key`` may be 0).

        Returns:
            ``(n_seg, dim)`` in ``seg.dtype``.
        """
        if self.variant == "none" or seg.shape[0] == 0 or key.shape[0] == 0:
            return seg
        dtype = seg.dtype
        # Attention in fp32 regardless of autocast/bf16 weights, as in the reference.
        with torch.autocast(device_type=seg.device.type, enabled=False):
            if self.variant == "gated":
                return self._gated(seg.float(), key.float()).to(dtype)
            x = resample_rows(seg.float(), self.config.num_queries)
            context = key.float()
            if self.variant == "reference":
                x = self.cross_attn(x, context)
                x = self.self_attn(x, x)
            else:
                x = self._layer_norm(self.norm_cross, x + self.cross_attn(x, context))
                x = self._layer_norm(self.norm_self, x + self.self_attn(x, x))
                x = self._layer_norm(self.norm_mlp, x + self._mlp(x))
            x = resample_rows(x, seg.shape[0])
        return x.to(dtype)

    def _gated(self, x: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """``x: (n, dim)``, ``key: (m, dim)`` fp32 -> ``(n, dim)`` fp32 (the ``gated``
        variant)."""
        cross, own, mlp = torch.tanh(self.gates.float())
        h = self._layer_norm(self.norm_cross, x)
        x = x + cross * self.cross_attn(h, key)
        h = self._layer_norm(self.norm_self, x)
        x = x + own * self.self_attn(h, h)
        return x + mlp * self._mlp(self._layer_norm(self.norm_mlp, x))

    @staticmethod
    def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, norm.normalized_shape, norm.weight.float(), norm.bias.float(),
                            norm.eps)

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        first, act, drop, second = self.mlp
        return _linear_fp32(second, drop(act(_linear_fp32(first, x))))
