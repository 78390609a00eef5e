"""InfiniGen's block scores in one pass over the partial keys, on CPU.

:func:`vllm_infinigen.method.scoring.block_scores` (the reference, and the
path on every other platform) is a chain of torch ops over a gathered copy of
the partial keys and a ``[requests, heads, tokens]`` logits tensor: at 16K
tokens x 4 requests it costs about as much as vLLM's CPU kernel reading the
whole KV (``benchmarks/speculation_cost.py``), so selection could not pay.
This module compiles ``cpu_scoring.cpp`` once per machine (PyTorch's C++
extension loader, cached under its extensions directory) into one op that
reads each partial key once and keeps only per-block sums: the same scores
at memory speed.

If the compiler or its toolchain is missing, :func:`load_block_scorer` logs
why and returns None, and the runtime keeps the torch ops.
"""

from __future__ import annotations

import functools
import hashlib
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vllm_infinigen.method.quant4 import PACKED_DTYPE, packed_width, quantize_query
from vllm_infinigen.method.scoring import BlockScoreRule

SOURCE = Path(__file__).with_name("cpu_scoring.cpp")

BlockScorer = Callable[..., torch.Tensor]

#: The C++ op's rule argument.
_RULE_CODES = {
    BlockScoreRule.MAX: 0,
    BlockScoreRule.LOG_MASS: 1,
}

#: The C++ op's "no block bias" and "no 8-bit query" arguments.
_NO_BIAS = torch.empty(0)
_NO_CODES = torch.empty(0, dtype=torch.int8)


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


@functools.lru_cache(maxsize=1)
def _compiled() -> Any:
    from torch.utils.cpp_extension import load_inline

    source = SOURCE.read_text()
    # The build targets this machine's instruction set: the cache key holds
    # the source and the CPU's flags, so another CPU builds its own.
    digest = hashlib.sha256((source + _cpu_flags()).encode()).hexdigest()[:12]
    return load_inline(
        name=f"infinigen_cpu_scoring_{digest}",
        cpp_sources=[source],
        functions=["block_scores", "write_packed"],
        extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp-simd"],
        verbose=False,
    )


def _module_or_none(log: Callable[[str], None] | None, what: str) -> Any:
    """The compiled module, or None where it cannot be built (``log``
    receives ``what`` and why)."""
    try:
        return _compiled()
    except Exception as error:  # noqa: BLE001 - any build failure: keep torch ops
        if log is not None:
            log(f"INFINIGEN fused CPU {what}: {error}")
        return None


def load_block_scorer(log: Callable[[str], None] | None = None) -> BlockScorer | None:
    """The fused scorer (compiling it on first use), or None where it cannot
    be built (``log`` receives why)."""
    module = _module_or_none(log, "scoring unavailable, using torch ops")
    if module is None:
        return None

    def scorer(
        query_partial: torch.Tensor,
        partial_key_cache: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        scale: float,
        rule: BlockScoreRule = BlockScoreRule.LOG_MASS,
        block_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Same contract as :func:`~vllm_infinigen.method.scoring.block_scores`
        (CPU tensors; partial keys in float32, bfloat16 or float16, or packed
        at 4 bits, uint8, :mod:`~vllm_infinigen.method.quant4`: scored by
        the query at 8 bits, in integer dot products where the CPU has them,
        else decoded to floats)."""
        num_reqs, max_blocks = block_table.shape
        if max_blocks == 0:
            return torch.full((num_reqs, partial_key_cache.shape[2], 0), float("-inf"))
        query = (query_partial.float() * scale).contiguous()
        codes, scales = _NO_CODES, _NO_BIAS
        if partial_key_cache.dtype == PACKED_DTYPE:  # as the torch path scores them
            codes, q_scale = quantize_query(query)
            query = (codes.float() * q_scale).contiguous()
            codes, scales = codes.contiguous(), q_scale.squeeze(-1).contiguous()
        table = block_table.clamp(min=0).to(torch.int32).contiguous()
        lens = seq_lens.to(torch.int32).contiguous()
        result: torch.Tensor = module.block_scores(
            query,
            partial_key_cache.contiguous(),
            table,
            lens,
            _NO_BIAS if block_bias is None else block_bias.float().contiguous(),
            _RULE_CODES[rule],
            codes,
            scales,
        )
        return result

    return scorer


PackedWriter = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def load_packed_writer(log: Callable[[str], None] | None = None) -> PackedWriter | None:
    """The fused 4-bit partial-key write (compiling it on first use), or None
    where it cannot be built (``log`` receives why): the same bytes as
    :func:`~vllm_infinigen.method.partial_cache.write_partial_keys` on a
    packed cache, in one call instead of a chain of small torch ops per
    layer and step."""
    module = _module_or_none(log, "partial-key write unavailable, using torch ops")
    if module is None:
        return None

    def write(
        partial_key_cache: torch.Tensor, partial_keys: torch.Tensor, slots: torch.Tensor
    ) -> None:
        """Args as ``write_partial_keys``: a packed ``[num_blocks, block_size,
        num_kv_heads, width]`` cache, ``[tokens, num_kv_heads, d_partial]``
        keys, ``[tokens]`` valid, distinct slots."""
        num_blocks, block_size, num_kv_heads, width = partial_key_cache.shape
        if width != packed_width(partial_keys.shape[-1]):
            raise ValueError(
                f"packed rows of {partial_keys.shape[-1]} channels are "
                f"{packed_width(partial_keys.shape[-1])} bytes, got {width}"
            )
        module.write_packed(
            partial_key_cache.view(num_blocks * block_size, num_kv_heads, width),
            partial_keys.float().contiguous(),
            slots.long().contiguous(),
        )

    return write
