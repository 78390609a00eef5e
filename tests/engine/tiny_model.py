"""The tiny attention model the runtime tests build (CPU and CUDA worlds).

Dimensions of its layers and one sparse layer's speculator, random but
seeded: ``HEADS`` query heads over ``KV`` KV heads of ``DIM`` channels, a
hidden size of ``HIDDEN``, ``P`` partial channels, blocks of ``BLOCK``
tokens.
"""

from __future__ import annotations

import torch

from vllm_infinigen.method.rotary import NeoxRotary
from vllm_infinigen.method.skew import LayerSkew
from vllm_infinigen.method.speculator import LayerSpeculator

BLOCK, KV, HEADS, DIM, HIDDEN, P = 4, 2, 4, 8, 16, 3


def speculator(seed: int, device: str = "cpu") -> LayerSpeculator:
    """A layer's speculator: a random orthogonal skew per KV head, ``P``
    random channels, random query weights."""
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(KV, DIM, DIM, generator=gen))
    channels = torch.stack([torch.randperm(DIM, generator=gen)[:P].sort().values] * KV)
    return LayerSpeculator.build(
        LayerSkew(basis.to(device), channels.to(device)),
        q_weight=torch.randn(HEADS * DIM, HIDDEN, generator=gen).to(device),
        q_bias=torch.randn(HEADS * DIM, generator=gen).to(device),
        num_heads=HEADS,
        rope=NeoxRotary(DIM),
    )
