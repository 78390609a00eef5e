"""Wiring INFINIGEN into a loaded vLLM model (called after ``load_model``).

Decides which attention layers are sparse, calibrates them, and, when the
model runs eagerly, installs the one-layer-ahead hooks: a forward pre-hook
on layer ``L-1``'s ``qkv_proj`` (its input is ``L-1``'s attention input
after the input layernorm) runs layer ``L``'s speculation and starts its
swap-in. A compiled model runs nothing between its graph's ops, so there
layer ``L``'s attention runs that step first (``cpu_backend``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from vllm.config import VllmConfig
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.logger import init_logger
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType

from vllm_infinigen.config import DEFAULT_CONFIG, InfiniGenConfig
from vllm_infinigen.engine.cpu_backend import InfiniGenCPUMetadata, prepare_decode_step
from vllm_infinigen.engine.layer_state import LAYER_ATTR, LayerInfo, SparseLayer
from vllm_infinigen.engine.policies.base import PolicyContext
from vllm_infinigen.engine.runtime import InfiniGenRuntime
from vllm_infinigen.method.speculator import HeadShard, LayerSpeculator

if TYPE_CHECKING:
    from vllm_infinigen.engine.cost_probe import StepCosts

PreHook = Callable[[torch.nn.Module, tuple[Any, ...]], None]
RuntimeT = TypeVar("RuntimeT", bound=InfiniGenRuntime)

#: ``sparse_min_tokens`` on vLLM's CPU build where the start-up probe of
#: decode costs (``engine/cost_probe.py``) fails: decode steps with fewer
#: context tokens read every block. From ``benchmarks/speculation_cost.py``
#: on one core of an earlier 2-core machine (selection about 0.54 ms per
#: layer plus 0.054 us per context token, vLLM's kernel 0.18 us per token:
#: reading 20% of the blocks paid from about 5.8K tokens), rounded up.
CPU_SPARSE_MIN_TOKENS = 8192

logger = init_logger("vllm.infinigen.setup")


def _previous_qkv_name(layer_name: str, index: int) -> str:
    """``model.layers.5.self_attn.attn`` -> ``model.layers.4.self_attn.qkv_proj``."""
    parts = layer_name.split(".")
    position = parts.index(str(index))
    parts[position] = str(index - 1)
    parts[-1] = "qkv_proj"
    return ".".join(parts)


def classify_layers(
    model: torch.nn.Module, attention_layers: dict[str, Any], config: InfiniGenConfig
) -> dict[int, LayerInfo]:
    """One :class:`LayerInfo` per attention layer, sparse or dense with why."""
    modules = dict(model.named_modules())
    infos: dict[int, LayerInfo] = {}
    for name, attn in attention_layers.items():
        index = extract_layer_index(name)
        impl = attn.impl
        reason = ""
        if getattr(attn, "attn_type", AttentionType.DECODER) != AttentionType.DECODER:
            reason = "not decoder self-attention"
        elif index == 0:
            reason = "first layer (no previous layer to speculate from)"
        elif index in config.dense_layers:
            reason = "listed in dense_layers"
        elif getattr(impl, "sliding_window", -1) not in (-1, None):
            reason = "sliding-window layer"
        elif _previous_qkv_name(name, index) not in modules:
            reason = "previous layer has no qkv_proj to hook"
        infos[index] = LayerInfo(
            index=index,
            name=name,
            scale=float(impl.scale),
            sparse=not reason,
            reason=reason,
        )
    return infos


def _make_hook(runtime: InfiniGenRuntime, target: SparseLayer) -> PreHook:
    name = target.info.name

    def hook(_module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if not is_forward_context_available():
            return
        all_metadata = get_forward_context().attn_metadata
        if not isinstance(all_metadata, dict):
            return
        meta = all_metadata.get(name)
        if isinstance(meta, InfiniGenCPUMetadata):
            prepare_decode_step(runtime, target, meta, args[0])

    return hook


def _policy_context(vllm_config: VllmConfig, head_dim: int | None) -> PolicyContext:
    """What the CPU platform offers the policies: reading keys back out of
    vLLM's packed CPU cache (H2O), checked before a policy relies on it."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from vllm_infinigen.engine.cpu_scoring import load_block_scorer, load_packed_writer
    from vllm_infinigen.engine.key_layout import key_tile_order, read_keys

    scorer = load_block_scorer(logger.warning)
    if scorer is not None:
        logger.info("INFINIGEN fused CPU block scoring ready")
    writer = load_packed_writer(logger.warning)
    block_size = vllm_config.cache_config.block_size
    dtype: Any = vllm_config.model_config.dtype
    cache_dtype = str(vllm_config.cache_config.cache_dtype)
    if head_dim is None:
        return PolicyContext(
            block_size=block_size,
            sparse_min_tokens=CPU_SPARSE_MIN_TOKENS,
            block_scorer=scorer,
            packed_writer=writer,
        )

    def order() -> torch.Tensor:
        isa = _get_attn_isa(dtype, block_size, head_dim, cache_dtype)
        return key_tile_order(isa, block_size, head_dim, dtype, cache_dtype)

    def reader(host_cache: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return read_keys(host_cache, ids, order())

    def check() -> None:
        order()  # raises UnreadableKeyLayout (a ValueError) naming why

    return PolicyContext(
        block_size=block_size,
        key_reader=reader,
        key_reader_check=check,
        sparse_min_tokens=CPU_SPARSE_MIN_TOKENS,
        block_scorer=scorer,
        packed_writer=writer,
    )


def _measure_step_costs(
    vllm_config: VllmConfig, runtime: InfiniGenRuntime
) -> StepCosts:
    """Time this worker's decode attention both ways (``engine/cost_probe.py``)
    and log the costs and the ``sparse_min_tokens`` they give."""
    from vllm_infinigen.engine.cost_probe import NEVER, probe_step_costs
    from vllm_infinigen.method.scoring import block_scores

    layer = next(iter(runtime.sparse.values()))
    selection = runtime.selection
    if selection.budget_fraction >= 1.0:  # reads everything now; a later
        # reconfigure to a budget scales the read from the default's
        selection = dataclasses.replace(
            selection, budget_fraction=DEFAULT_CONFIG.budget
        )
    speculator = layer.speculator
    dtype: Any = vllm_config.model_config.dtype
    start = time.perf_counter()
    costs = probe_step_costs(
        num_heads=speculator.num_heads,
        num_kv_heads=speculator.num_kv_heads,
        head_dim=speculator.head_dim,
        d_partial=speculator.d_partial,
        block_size=runtime.block_size,
        dtype=dtype,
        partial_dtype=runtime.partial_dtype(dtype),
        score=runtime.context.block_scorer or block_scores,
        selection=selection,
    )
    threshold = costs.threshold(runtime.config.budget)
    logger.info(
        "INFINIGEN decode costs per layer on this CPU (%.1f s probe, %d "
        "threads): vLLM's "
        "kernel %.4f us per context token; choosing blocks %.3f ms + %.4f us "
        "per token, reading budget %.2f of them %.4f us per token: sparse "
        "decode from %s context tokens per step (sparse_min_tokens unset; "
        "set it to override)",
        time.perf_counter() - start,
        torch.get_num_threads(),
        costs.dense_us_per_token,
        costs.choose_fixed_ms,
        costs.choose_us_per_token,
        costs.budget,
        costs.read_us_per_token,
        "never (it does not pay here)" if threshold == NEVER else threshold,
    )
    return costs


def _rank_speculators(
    speculators: dict[int, LayerSpeculator],
    attention_layers: dict[str, Any],
    infos: dict[int, LayerInfo],
) -> dict[int, LayerSpeculator]:
    """This tensor-parallel rank's share of each calibrated layer (the whole
    layer at ``tensor_parallel_size`` 1)."""
    from vllm.distributed import (
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
    )

    tp_size = get_tensor_model_parallel_world_size()
    if tp_size == 1:
        return speculators
    rank = get_tensor_model_parallel_rank()
    out = {}
    shards: dict[tuple[range, range], None] = {}  # distinct, in order
    for index, whole in speculators.items():
        heads = HeadShard.of_rank(whole.num_heads, whole.num_kv_heads, tp_size, rank)
        part = whole.shard(heads)
        impl = attention_layers[infos[index].name].impl
        if (part.num_heads, part.num_kv_heads) != (impl.num_heads, impl.num_kv_heads):
            raise ValueError(
                f"INFINIGEN: layer {index} on tensor-parallel rank {rank} computes "
                f"{impl.num_heads} query / {impl.num_kv_heads} KV heads, but the "
                f"calibrated layer splits into {part.num_heads} / {part.num_kv_heads}"
            )
        out[index] = part
        shards[(heads.query_heads, heads.kv_heads)] = None
    for query, kv in shards:
        logger.info(
            "INFINIGEN tensor-parallel rank %d of %d speculates for query heads "
            "%d..%d and KV heads %d..%d",
            rank,
            tp_size,
            query.start,
            query.stop - 1,
            kv.start,
            kv.stop - 1,
        )
    return out


def install_runtime(
    vllm_config: VllmConfig,
    model: torch.nn.Module,
    make_runtime: Callable[
        [InfiniGenConfig, dict[int, LayerInfo], dict[int, LayerSpeculator]],
        RuntimeT,
    ],
    make_hook: Callable[[RuntimeT, SparseLayer], PreHook],
) -> RuntimeT:
    """Set a platform's runtime up for ``model`` (both platforms' set-ups).

    Classifies the attention layers, calibrates the sparse ones and takes
    this tensor-parallel rank's share, builds the runtime with
    ``make_runtime(options, layers, speculators)``, attaches each sparse
    layer's state to its attention module and, when the model runs eagerly,
    installs ``make_hook(runtime, layer L)`` as the forward pre-hook of layer
    ``L-1``'s ``qkv_proj``.
    """
    from vllm_infinigen.engine.calibration import calibrate_model

    config = InfiniGenConfig.from_additional_config(vllm_config.additional_config)
    attention_layers = {
        name: layer
        for name, layer in vllm_config.compilation_config.static_forward_context.items()
        if hasattr(layer, "impl") and hasattr(layer, "layer_name")
    }
    infos = classify_layers(model, attention_layers, config)
    sparse = sorted(i for i, info in infos.items() if info.sparse)
    dense = {i: info.reason for i, info in sorted(infos.items()) if not info.sparse}
    logger.info("INFINIGEN sparse layers %s; dense layers %s", sparse, dense)
    config = config.for_model(len(sparse), len(infos))
    logger.info(
        "INFINIGEN scores %s keys (partial_ratio %s, partial_dtype %s) by %s",
        "whole" if config.partial_ratio == 1.0 else "partial",
        config.partial_ratio,
        config.partial_dtype,
        config.block_score_rule,
    )
    speculators = calibrate_model(vllm_config.model_config.model, config, sparse)
    speculators = _rank_speculators(speculators, attention_layers, infos)
    runtime = make_runtime(config, infos, speculators)
    modules = dict(model.named_modules())
    # A compiled model runs no Python between its graph's ops: the ahead
    # step then runs inside each layer's attention (the backend's forward).
    runtime.hooked = _runs_eagerly(vllm_config)
    logger.info(
        "INFINIGEN ahead step runs %s",
        "from pre-hooks on the previous layers' qkv_proj (eager model)"
        if runtime.hooked
        else "inside each sparse layer's attention (compiled model)",
    )
    for index, state in runtime.sparse.items():
        setattr(attention_layers[state.info.name], LAYER_ATTR, state)
        if runtime.hooked:
            qkv = modules[_previous_qkv_name(state.info.name, index)]
            qkv.register_forward_pre_hook(make_hook(runtime, state))
    return runtime


def _runs_eagerly(vllm_config: VllmConfig) -> bool:
    from vllm.config import CompilationMode

    return bool(vllm_config.compilation_config.mode == CompilationMode.NONE)


def setup_runtime(vllm_config: VllmConfig, model: torch.nn.Module) -> InfiniGenRuntime:
    """Build this worker's runtime for ``model`` on vLLM's CPU platform and
    install its hooks."""

    def make_runtime(
        config: InfiniGenConfig,
        infos: dict[int, LayerInfo],
        speculators: dict[int, LayerSpeculator],
    ) -> InfiniGenRuntime:
        head_dim = next(iter(speculators.values())).head_dim if speculators else None
        context = _policy_context(vllm_config, head_dim)
        runtime = InfiniGenRuntime(config, infos, speculators, context)
        if config.sparse_min_tokens is None and runtime.sparse:
            try:
                context.step_costs = _measure_step_costs(vllm_config, runtime)
            except Exception as error:  # noqa: BLE001 - keep the fixed default
                logger.warning(
                    "INFINIGEN could not measure decode costs (%s); decode steps "
                    "under %d context tokens read every block",
                    error,
                    CPU_SPARSE_MIN_TOKENS,
                )
        return runtime

    return install_runtime(vllm_config, model, make_runtime, _make_hook)
