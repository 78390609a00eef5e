"""What the method needs from a model's rotary embedding and head norms.

The method never owns a model's RoPE: it is handed a callable. vLLM's
``RotaryEmbedding`` (flattened ``[tokens, heads * head_dim]``, query and key
together) and Hugging Face's ``rotary_emb`` + ``apply_rotary_pos_emb`` have
different calling conventions, so the engine (or the HF helper) adapts them to
:class:`RotaryFn`. :class:`NeoxRotary` is a plain implementation of the
"rotate half" (GPT-NeoX) convention used by Llama, Qwen2 and Qwen3, for tests
and for the Hugging Face helper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class RotaryFn(Protocol):
    """Rotates query or key vectors to their positions.

    Args:
        positions: ``[tokens]`` int64 positions.
        x: ``[tokens, heads, head_dim]`` pre-rotation queries or keys.

    Returns:
        ``[tokens, heads, head_dim]`` rotated vectors, same dtype as ``x``.
    """

    def __call__(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor: ...


class HeadNormFn(Protocol):
    """A per-head norm applied after the projection (Qwen3/Gemma 3 ``q_norm``).

    Args:
        x: ``[tokens, heads, head_dim]``.

    Returns:
        ``[tokens, heads, head_dim]``.
    """

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[..., d] -> [..., d]``: ``(x1, x2) -> (-x2, x1)`` over the two halves."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_neox_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """Rotate-half RoPE.

    Args:
        x: ``[tokens, heads, head_dim]``.
        cos, sin: ``[tokens, head_dim]`` tables for the tokens' positions.

    Returns:
        ``[tokens, heads, head_dim]`` in ``x``'s dtype.
    """
    cos = cos[:, None, :].to(x.dtype)
    sin = sin[:, None, :].to(x.dtype)
    return x * cos + rotate_half(x) * sin


@dataclass(frozen=True)
class NeoxRotary:
    """Standard RoPE (no scaling) over the full head, rotate-half convention.

    ``inv_freq[i] = base ** (-2 i / head_dim)``; the angle of channel ``i`` and
    of its partner ``i + head_dim / 2`` at position ``p`` is ``p * inv_freq[i]``.
    """

    head_dim: int
    base: float = 10000.0

    def tables(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions: [tokens]`` -> ``(cos, sin)``, each ``[tokens, head_dim]``."""
        exponent = torch.arange(
            0, self.head_dim, 2, dtype=torch.float64, device=positions.device
        )
        inv_freq = self.base ** (-exponent / self.head_dim)
        angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().float(), angles.sin().float()

    def __call__(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        cos, sin = self.tables(positions.to(x.device))
        return apply_neox_rotary(x, cos, sin)
