"""Partial keys packed at 4 bits (option ``partial_dtype: int4``).

The only module that knows the packed format. Each (token, KV head) row of
``d_partial`` numbers becomes ``packed_width(d_partial) = ceil(d_partial / 2)
+ 2`` bytes:

* bytes ``0 .. ceil(d_partial / 2) - 1``: the codes, two per byte, channel
  ``2 i`` in the low nibble of byte ``i`` and channel ``2 i + 1`` in its high
  nibble (an odd ``d_partial`` leaves the last high nibble unused);
  offset binary: nibble ``n`` is the code ``n - 8``, and the codes lie in
  ``[-7, 7]`` (symmetric: nibble 0, code -8, is never written);
* the last 2 bytes: the row's float16 scale (``max |k| / 7``, rounded up
  to a float16 and capped at float16's largest finite value), its bits
  little-endian.

A number is ``code * scale``; quantization rounds ``k / scale`` to the
nearest code, so every element is within ``scale / 2`` of its key (rows
whose ``max |k|`` exceeds ``7 * 65504`` excepted: their scale is capped). A
zero row (and a zero-filled cache) has scale 0 and decodes to zeros.

One uint8 tensor holds both parts so that a cache block stays one
contiguous row of bytes: every block gather that reads float partial keys
reads packed ones too. Pure torch, no host sync.
"""

from __future__ import annotations

import math

import torch

#: Storage type of a packed cache (``partial_dtype: int4``).
PACKED_DTYPE = torch.uint8

#: Largest code magnitude: symmetric 4-bit codes in [-7, 7].
MAX_CODE = 7

#: Nibble of code 0 (offset binary).
_OFFSET = 8

#: Bytes of the per-row scale (float16).
SCALE_BYTES = 2


def code_bytes(d_partial: int) -> int:
    """Bytes of one row's codes: two channels per byte."""
    return (d_partial + 1) // 2


def packed_width(d_partial: int) -> int:
    """Bytes of one packed (token, KV head) row: codes, then the scale."""
    return code_bytes(d_partial) + SCALE_BYTES


def pack_int4(keys: torch.Tensor) -> torch.Tensor:
    """Quantize rows of keys to 4-bit codes with one scale per row.

    Args:
        keys: ``[..., d_partial]`` floating keys (one row per token and KV
            head).

    Returns:
        ``[..., packed_width(d_partial)]`` uint8 on ``keys``' device.
    """
    d_partial = keys.shape[-1]
    k = keys.float()
    half_max = torch.finfo(torch.float16).max
    wanted = (k.abs().amax(dim=-1, keepdim=True) / MAX_CODE).clamp(max=half_max)
    # The stored scale, rounded up to a float16 (so that the largest
    # magnitude needs no code beyond 7): quantize against it.
    scale = wanted.to(torch.float16)
    up = torch.nextafter(scale, torch.full_like(scale, math.inf))
    scale = torch.where(scale.float() < wanted, up, scale)
    divisor = scale.float()
    ratio = torch.where(divisor > 0, k / divisor.clamp(min=1e-30), 0.0)
    codes = ratio.round_().clamp_(-MAX_CODE, MAX_CODE).add_(_OFFSET).to(torch.uint8)
    if d_partial % 2:
        codes = torch.nn.functional.pad(codes, (0, 1), value=_OFFSET)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    bits = scale.view(torch.int16).int()
    low, high = (bits & 0xFF).to(torch.uint8), ((bits >> 8) & 0xFF).to(torch.uint8)
    return torch.cat([packed, low, high], dim=-1)


def unpack_int4(rows: torch.Tensor, d_partial: int) -> torch.Tensor:
    """Dequantize packed rows (:func:`pack_int4`'s inverse, up to rounding).

    Args:
        rows: ``[..., packed_width(d_partial)]`` uint8.
        d_partial: numbers per row.

    Returns:
        ``[..., d_partial]`` float32.
    """
    width = code_bytes(d_partial)
    if rows.shape[-1] != width + SCALE_BYTES:
        raise ValueError(
            f"packed rows of {d_partial} channels are {width + SCALE_BYTES} "
            f"bytes, got {rows.shape[-1]}"
        )
    packed = rows[..., :width]
    nibbles = torch.stack([packed & 0xF, packed >> 4], dim=-1)
    codes = nibbles.flatten(-2)[..., :d_partial].float().sub_(_OFFSET)
    return codes.mul_(row_scales(rows))


def row_scales(rows: torch.Tensor) -> torch.Tensor:
    """Each packed row's scale: ``[..., packed_width]`` uint8 -> ``[..., 1]``
    float32. (Assembled from its two bytes: a row's scale may start at an
    odd byte, where a byte-to-half view is refused.)"""
    low = rows[..., -SCALE_BYTES:-1].int()
    high = rows[..., -1:].int()
    bits = low | (high << 8)
    bits = bits - ((bits >> 15) << 16)  # the int16 with these bits
    return bits.to(torch.int16).view(torch.float16).float()


#: Largest magnitude of a query number at 8 bits.
QUERY_MAX_CODE = 127


def quantize_query(query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A query at 8 bits, for scoring keys packed at 4 bits.

    Against 4-bit keys a query's rounding to 8 bits (an error below 1/254 of
    its largest number, per head) is far below the keys' own (1/14 of
    theirs), and it lets the CPU scorer form each logit as a sum of integer
    products, four channels to an instruction (``engine/cpu_scoring.cpp``).
    Both scorers score packed keys with this query, so that they agree.

    Args:
        query: ``[..., d]`` float32 (in logit units: the softmax scale
            already applied).

    Returns:
        ``[..., d]`` int8 codes in ``[-127, 127]`` and ``[..., 1]`` float32
        scales (``max |q| / 127``; 0 for a zero row, whose codes are 0): the
        query is ``codes * scale``.
    """
    q = query.float()
    scale = q.abs().amax(dim=-1, keepdim=True) / QUERY_MAX_CODE
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = (q / safe).round_().clamp_(-QUERY_MAX_CODE, QUERY_MAX_CODE)
    return codes.to(torch.int8), scale
