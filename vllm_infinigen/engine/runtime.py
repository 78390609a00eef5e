"""The worker-side state of INFINIGEN: one runtime per worker, one
:class:`~.layer_state.SparseLayer` per sparse layer.

Built after the model loads (``patches/model_load.py`` -> ``engine/setup.py``)
and kept on vLLM's model runner (``model_runner.infinigen_runtime``); each
sparse layer's state is attached to its attention module, where the backend
finds it. The runtime is platform-neutral: it decides which blocks each
decode request reads (scores from the active :mod:`policy <.policies>`, then
:func:`~vllm_infinigen.method.selection.select_blocks`), plans the read
(placement, ``engine/placement.py``) and, for the staging placement, starts
the copy (movement, ``engine/copier.py``); the platform's backend runs the
attention over the plan.

Two placements (option ``swap_mode``):

* ``in_place`` (the CPU default): the kernel reads the selected host blocks
  where they lie through a compacted block table of host block ids. When
  every request of a step fits its budget, or the policy reads everything,
  the step takes vLLM's own dense path: nothing is prepared.
* ``sync`` / ``thread`` (staging, the GPU shape): the selected blocks are
  copied into a staging buffer, inline or on a worker thread, and the kernel
  reads the staging slots; every decode step goes through the copy, even
  when every block is read.

Speculation for layer ``L`` runs from a forward pre-hook on layer ``L-1``'s
``qkv_proj`` in an eager model, or first thing in layer ``L``'s attention in
a compiled one (:meth:`InfiniGenRuntime.prepare_ahead`,
:attr:`InfiniGenRuntime.hooked`); a policy that needs the layer's own query
chooses at attention (:meth:`InfiniGenRuntime.prepare_at_attention`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from vllm.logger import init_logger

from vllm_infinigen.config import InfiniGenConfig
from vllm_infinigen.engine.copier import BlockCopier
from vllm_infinigen.engine.cost_probe import NEVER
from vllm_infinigen.engine.layer_state import LayerInfo, PreparedRead, SparseLayer
from vllm_infinigen.engine.placement import StagingPlan, plan_in_place, plan_staging
from vllm_infinigen.engine.policies.base import BlockPolicy, PolicyContext
from vllm_infinigen.engine.policies.registry import POLICIES, make_policy, policy_class
from vllm_infinigen.engine.stats import StepStats, snapshot
from vllm_infinigen.method.counters import count_selected_blocks
from vllm_infinigen.method.partial_cache import write_partial_keys, write_residual_sums
from vllm_infinigen.method.quant4 import PACKED_DTYPE
from vllm_infinigen.method.recall import selected_share
from vllm_infinigen.method.scoring import BlockScoreRule
from vllm_infinigen.method.selection import (
    BlockSelection,
    HeadReduction,
    SelectionPolicy,
    blocks_for,
    budget_blocks,
    num_blocks_of,
    select_blocks,
    selection_from_mask,
    valid_blocks,
)
from vllm_infinigen.method.speculator import LayerSpeculator

logger = init_logger("vllm.infinigen.runtime")


@dataclass(frozen=True)
class KVWrite:
    """Where one step's new tokens go, the same for every layer of a KV
    cache group: computed once per step (:func:`plan_kv_write`), used by
    each layer's :meth:`InfiniGenRuntime.on_kv_write`."""

    tokens: int
    """Length of the slot mapping (padding included)."""
    rows: torch.Tensor | None
    """``[valid]`` int64 tokens with a slot, or None when every token has one."""
    slots: torch.Tensor
    """``[valid]`` int64 their slots."""
    fresh: torch.Tensor
    """int64 blocks written from their first slot (new to their request)."""


def plan_kv_write(slot_mapping: torch.Tensor, block_size: int) -> KVWrite:
    """The write plan of a slot mapping (``-1``: padding, skipped)."""
    slots = slot_mapping.long()
    rows = None
    if bool((slots < 0).any()):
        rows = torch.nonzero(slots >= 0).flatten()
        slots = slots[rows]
    fresh = torch.div(slots[slots % block_size == 0], block_size, rounding_mode="floor")
    return KVWrite(slot_mapping.shape[0], rows, slots, fresh)


def selection_policy(config: InfiniGenConfig, policy: BlockPolicy) -> SelectionPolicy:
    """The block-selection parameters of a configuration and policy: a policy
    that uses ``alpha`` keeps its threshold, the others take pure top-k, so
    every policy reads the same number of blocks per request at one budget."""
    rule = BlockScoreRule(config.block_score_rule)
    # alpha is a margin of mass: the max rule takes its top-k whole.
    threshold = (
        policy.uses_alpha and not config.is_exact and rule is BlockScoreRule.LOG_MASS
    )
    return SelectionPolicy(
        alpha=config.alpha if threshold else float("inf"),
        budget_fraction=config.budget,
        max_blocks=config.max_blocks,
        sink_blocks=config.sink_blocks,
        recent_blocks=config.recent_blocks,
        min_blocks=config.min_blocks,
        head_reduction=HeadReduction(config.head_reduction),
        score_rule=rule,
        residual=config.residual_means,
    )


@dataclass
class _OpenStep:
    """The decode step in progress (per-step histograms)."""

    whole: bool
    selection_s: float = 0.0
    wait_s: float = 0.0
    staged: bool = False


class InfiniGenRuntime:
    """Selection, placement and (staging) movement for every sparse layer."""

    def __init__(
        self,
        config: InfiniGenConfig,
        layers: dict[int, LayerInfo],
        speculators: dict[int, LayerSpeculator],
        context: PolicyContext,
    ) -> None:
        self.config = config
        self.layers = layers
        self.context = context
        self.block_size = context.block_size
        self.sparse: dict[int, SparseLayer] = {
            index: SparseLayer(self, info, speculators[index], context.block_size)
            for index, info in sorted(layers.items())
            if info.sparse
        }
        self.copier: BlockCopier | None = None
        self.place(config.swap_mode)
        self.policies: dict[str, BlockPolicy] = {}
        """Tracked policies (their device metadata is maintained)."""
        self.track([config.policy])
        self.policy = self.policies[config.policy]
        self.selection = selection_policy(config, self.policy)
        self.steps = StepStats()
        """Per-step counters and histograms (metrics)."""
        self._layers = list(self.sparse.values())
        """The sparse layers in order (the step's first opens it, the last
        closes it; recall samples them in turn)."""
        self._first = self._layers[0] if self._layers else None
        self._last = self._layers[-1] if self._layers else None
        self._step: _OpenStep | None = None
        self._recall_countdown = 0
        self._recall_turn = 0
        self._recall_layer: SparseLayer | None = None
        self.hooked = True
        """The one-layer-ahead pre-hooks are installed (eager mode). Without
        them (a compiled model) each sparse layer's attention runs its own
        ahead step first, and an option that would have selection read the
        previous layer's input is refused (:meth:`reconfigure`)."""
        self._recall_ok = context.key_reader is not None
        if self._recall_ok and context.key_reader_check is not None:
            try:
                context.key_reader_check()
            except Exception as error:  # noqa: BLE001 - recall is optional
                logger.info("INFINIGEN selection recall not sampled: %s", error)
                self._recall_ok = False

    def place(self, swap_mode: str) -> None:
        """Choose how decode reads the selected blocks for ``swap_mode``: in
        place, or through staging filled by a copier of that mode.

        Called by the constructor (``config`` and ``layers`` are set by
        then) and by :meth:`reconfigure`. A platform that moves blocks its
        own way overrides it, together with :attr:`in_place`.
        """
        if self.copier is not None and self.copier.mode != swap_mode:
            self.copier.shutdown()
            self.copier = None
        if swap_mode != "in_place" and self.copier is None:
            self.copier = BlockCopier(swap_mode)

    def partial_dtype(self, key_dtype: torch.dtype) -> torch.dtype:
        """Storage type of the partial-key cache for keys of ``key_dtype``
        (``int4``: :data:`~vllm_infinigen.method.quant4.PACKED_DTYPE`, uint8;
        :func:`~vllm_infinigen.method.partial_cache.partial_key_bytes` gives
        its bytes per token and KV head)."""
        name = self.config.partial_dtype
        if name == "int4":
            return PACKED_DTYPE
        if name != "auto":
            return getattr(torch, name)  # type: ignore[no-any-return]
        # Scores need no more than half precision: a float32 model's partial
        # keys are stored as bfloat16 (half the bytes speculation reads).
        return torch.bfloat16 if key_dtype.itemsize > 2 else key_dtype

    @property
    def ahead(self) -> bool:
        """The active policy chooses one layer ahead (else at attention)."""
        return chooses_ahead(self.policy, self.config.query_source, self.in_place)

    @property
    def speculates(self) -> bool:
        """Selection reads the previous layer's attention input (InfiniGen's
        speculated query), which only the pre-hooks hand over."""
        return self.ahead and self.policy.uses_layer_input

    @property
    def in_place(self) -> bool:
        """The kernel reads selected blocks in place (no copier; see
        :meth:`place`)."""
        return self.copier is None

    @property
    def speculators(self) -> dict[int, LayerSpeculator]:
        return {i: layer.speculator for i, layer in self.sparse.items()}

    # -------------------------------------------------------- KV write (tier)
    def on_kv_write(
        self,
        layer: SparseLayer,
        key: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        write: KVWrite | None = None,
    ) -> None:
        """Store the new tokens' partial keys (device tier) and every tracked
        policy's metadata.

        Args:
            key: ``[tokens, num_kv_heads, head_dim]`` post-RoPE keys.
            kv_cache: the layer's host-tier cache.
            slot_mapping: ``[tokens]`` slots (``-1`` for padding).
            write: the step's :func:`plan_kv_write` of ``slot_mapping``
                (computed here when not given).
        """
        cache = layer.allocate(kv_cache, key)
        if write is None or write.tokens != slot_mapping.shape[0]:
            write = plan_kv_write(slot_mapping, self.block_size)
        keys = key[: write.tokens]
        if write.rows is not None:
            keys = keys[write.rows]
        partial = layer.speculator.partial_keys(keys)
        writer = self.context.packed_writer
        if writer is not None and cache.dtype == PACKED_DTYPE:
            writer(cache, partial, write.slots)
        else:
            write_partial_keys(cache, partial, write.slots)
        # A block written from its first slot is new to its request: its
        # counters, residual sums and metadata start again (nothing stale
        # after reuse).
        if layer.residual_sums is not None:
            assert layer.residual_fill is not None
            write_residual_sums(
                layer.residual_sums,
                layer.speculator.residual_keys(keys),
                write.slots,
                self.block_size,
                write.fresh,
                layer.residual_fill,
            )
        assert layer.counters is not None
        layer.counters.index_fill_(0, write.fresh, 0)
        for policy in self.policies.values():
            policy.on_kv_write(layer, keys, write.slots, write.fresh)

    # ------------------------------------------------------------- selection
    @property
    def sparse_min_tokens(self) -> int:
        """Decode steps with fewer context tokens (all requests) read whole."""
        value = self.config.sparse_min_tokens
        if value is not None:
            return value
        costs = self.context.step_costs
        if costs is not None:  # measured on this machine, at this budget
            return costs.threshold(self.config.budget)
        return self.context.sparse_min_tokens

    def reads_everything(
        self,
        max_seq_len: int,
        total_tokens: int,
        seq_lens: torch.Tensor | None = None,
    ) -> bool:
        """Whether the step reads every block of every decode request: the
        policy reads everything, the budget covers every block, the step is
        too short for selection to pay (``total_tokens``: the decode
        requests' context tokens; ``seq_lens``, where given, lets the
        measured costs count what each request would still read, its block
        floor included), or no request is longer than its forced blocks
        (``max_seq_len``: the longest)."""
        if (
            self.config.is_exact
            or self.policy.reads_everything
            or not self._sparse_pays(total_tokens, seq_lens)
        ):
            return True
        width = blocks_for(max_seq_len, self.block_size)
        policy = self.selection
        return width <= max(
            policy.sink_blocks + policy.recent_blocks, policy.effective_min_blocks
        )

    def _sparse_pays(self, total_tokens: int, seq_lens: torch.Tensor | None) -> bool:
        """An explicit ``sparse_min_tokens`` decides alone. Left unset, the
        costs measured at start-up decide: the step's context must reach
        their threshold (where reading the budget's share pays), and then,
        with the requests' lengths known, the tokens the selection would
        still read (each request's budget in blocks, never under its floor
        of ``min_blocks``, sink and newest blocks) must make the sparse step
        cheaper than the dense one."""
        if self.config.sparse_min_tokens is not None:
            return total_tokens >= self.config.sparse_min_tokens
        costs = self.context.step_costs
        if total_tokens < self.sparse_min_tokens:
            return False
        if costs is None or seq_lens is None:
            return True
        blocks = num_blocks_of(seq_lens, self.block_size)
        read = torch.minimum(
            budget_blocks(blocks, self.selection) * self.block_size, seq_lens
        )
        return costs.pays(total_tokens, int(read.sum()), self.config.budget)

    def prepare_ahead(
        self,
        layer: SparseLayer,
        x: torch.Tensor | None,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        max_seq_len: int,
        total_tokens: int,
        extra_slots: int = 0,
        total_blocks: int | None = None,
    ) -> None:
        """Choose layer ``layer``'s blocks for the decode requests, one layer
        ahead, and prepare their read.

        Args:
            x: ``[num_decodes, hidden]`` the previous layer's attention input
                of the decode tokens (``None`` when the policy does not use it).
            block_table: ``[num_decodes, max_blocks]`` physical block ids.
            seq_lens: ``[num_decodes]`` tokens per request, this step's token
                included.
            max_seq_len: ``max(seq_lens)`` (a host int from the metadata).
            total_tokens: ``sum(seq_lens)`` (a host int from the metadata).
            extra_slots: staging room to keep for this step's prefill blocks.
            total_blocks: the decode requests' blocks (a host int, when the
                metadata has it: the dense path then counts without tensor
                ops).
        """
        if layer.partial_cache is None:  # no KV written yet (profiling run)
            return
        if layer.pending is not None:  # an aborted step left it
            self._drop(layer)
        whole = self.reads_everything(max_seq_len, total_tokens, seq_lens)
        if layer is self._first:
            self._begin_step(int(seq_lens.shape[0]), whole)
        if self.in_place and whole:
            # vLLM's dense path reads the host tier as is: only count.
            if total_blocks is None:
                n_blocks = num_blocks_of(seq_lens, self.block_size)
                layer.tally(n_blocks, n_blocks)
            else:
                layer.tally_dense(total_blocks, int(seq_lens.shape[0]))
            layer.stats.steps += 1
            layer.stats.dense_steps += 1
            return
        start = time.perf_counter()
        width = blocks_for(max_seq_len, self.block_size)
        table = block_table[:, :width]
        if whole:
            selection = selection_from_mask(
                valid_blocks(seq_lens, self.block_size, width)
            )
        elif not self.ahead:
            return  # chosen at attention, from the layer's own query
        else:
            assert x is not None or not self.policy.uses_layer_input
            scores = self.policy.scores_ahead(layer, x, table, seq_lens, self.selection)
            selection = self._select(layer, scores, seq_lens)
        self._prepare(layer, selection, table, seq_lens, extra_slots, start)

    def needs_input(self, total_tokens: int) -> bool:
        """Whether :meth:`prepare_ahead` reads the previous layer's input."""
        return (
            self.speculates
            and not self.policy.reads_everything
            and total_tokens >= self.sparse_min_tokens
        )

    def prepare_at_attention(
        self,
        layer: SparseLayer,
        query: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        max_seq_len: int,
        total_tokens: int,
        extra_slots: int = 0,
    ) -> PreparedRead | None:
        """A policy that chooses from the layer's real decode queries
        (``[num_decodes, num_heads, head_dim]``): choose and prepare now.

        Returns the read, or None when this layer chose one layer ahead,
        takes the dense path, or has no KV yet (profiling run).
        """
        if (
            self.ahead
            or layer.partial_cache is None
            or self.reads_everything(max_seq_len, total_tokens, seq_lens)
        ):
            return None
        start = time.perf_counter()
        width = blocks_for(max_seq_len, self.block_size)
        table = block_table[:, :width]
        scores = self.policy.scores_at_attention(
            layer, query, table, seq_lens, self.selection
        )
        selection = self._select(layer, scores, seq_lens)
        self._prepare(layer, selection, table, seq_lens, extra_slots, start)
        return self.take(layer)

    def _select(
        self, layer: SparseLayer, scores: torch.Tensor, seq_lens: torch.Tensor
    ) -> BlockSelection:
        return select_blocks(scores, seq_lens, self.block_size, self.selection)

    def _prepare(
        self,
        layer: SparseLayer,
        selection: BlockSelection,
        table: torch.Tensor,
        seq_lens: torch.Tensor,
        extra_slots: int,
        start: float,
    ) -> None:
        """Plan a selection's read, count it and (staging) start its copy."""
        assert layer.counters is not None and layer.host_cache is not None
        count_selected_blocks(layer.counters, table, selection)
        plan_read = plan_in_place if self.copier is None else plan_staging
        plan = plan_read(selection, table, seq_lens, self.block_size)
        layer.tally(plan.dense_counts, plan.counts)
        spent = time.perf_counter() - start
        layer.stats.speculation_s += spent
        if self._step is not None:
            self._step.selection_s += spent
        handle = None
        if self.copier is not None:
            assert isinstance(plan, StagingPlan)
            handle = self.copier.submit(
                layer.index, layer.host_cache, plan.src_block_ids, extra_slots
            )
        layer.pending = PreparedRead(plan, handle)
        layer.stats.steps += 1

    def take(self, layer: SparseLayer) -> PreparedRead | None:
        """This step's read for a layer (removed: each is used once)."""
        pending, layer.pending = layer.pending, None
        return pending

    def finish_staging(self, layer: SparseLayer, read: PreparedRead) -> torch.Tensor:
        """Wait for a layer's staging copy, re-copy the newest blocks (written
        this step, after the copy started) and return the staging buffer."""
        assert read.handle is not None and layer.host_cache is not None
        staging = read.handle.wait()
        plan = read.staging
        BlockCopier.refresh(
            layer.host_cache, staging, plan.newest_src, plan.newest_slot
        )
        layer.stats.swap_s += read.handle.copy_s
        layer.stats.wait_s += read.handle.wait_s
        if self._step is not None:
            self._step.wait_s += read.handle.wait_s
            self._step.staged = True
        return staging

    def _drop(self, layer: SparseLayer) -> None:
        read = self.take(layer)
        if read is not None and read.handle is not None:
            read.handle.wait()

    @property
    def observers(self) -> list[BlockPolicy]:
        """Tracked policies that observe attention."""
        return [p for p in self.policies.values() if p.observes_attention]

    # ------------------------------------------------------- reconfiguration
    def track(self, policies: list[str] | tuple[str, ...]) -> list[str]:
        """Maintain these policies' device metadata from now on (blocks
        written earlier have none), so a later :meth:`reconfigure` to them
        finds it ready."""
        unknown = [p for p in policies if p not in POLICIES]
        if unknown:
            raise ValueError(
                f"infinigen option 'policy' must be one of {list(POLICIES)}, "
                f"got {unknown[0]!r}"
            )
        for name in policies:
            if name not in self.policies:
                policy = make_policy(name, self.context)
                policy.check_supported()
                self.policies[name] = policy
        return sorted(self.policies)

    def reconfigure(self, options: dict[str, Any]) -> dict[str, Any]:
        """Change selection options between requests. Validated like start-up
        options; every tracked policy starts a new run (H2O's decode-time
        mass is cleared back to prefill's). Switching ``swap_mode`` to a
        staging mode allocates staging buffers that vLLM's automatic KV size
        did not leave room for when the engine started in place.

        Returns the effective options.
        """
        config = self.config.changed(options)
        if not self.hooked:
            cls = policy_class(config.policy)
            in_place = config.swap_mode == "in_place"
            if cls.uses_layer_input and chooses_ahead(
                cls, config.query_source, in_place
            ):
                raise ValueError(
                    f"infinigen policy {config.policy!r} with swap_mode "
                    f"{config.swap_mode!r} and query_source {config.query_source!r} "
                    "speculates from the previous layer's input, which needs "
                    "eager mode: set these options at start-up (or start with "
                    "--enforce-eager) to change them while serving"
                )
        if any(layer.pending is not None for layer in self.sparse.values()):
            raise RuntimeError("INFINIGEN: reconfigure called during a step")
        self.track([config.policy])
        self.place(config.swap_mode)
        self.config = config
        self.policy = self.policies[config.policy]
        self.selection = selection_policy(config, self.policy)
        for policy in self.policies.values():
            policy.start_run()
        return config.to_dict()

    # ------------------------------------------------------------ step stats
    def _begin_step(self, num_decodes: int, whole: bool) -> None:
        """A decode step starts (its first sparse layer): count it and pick
        whether (and where) it samples the selection's recall."""
        self._end_step()
        self._step = _OpenStep(whole)
        if whole:
            self.steps.whole_steps += 1
            self.steps.whole_requests += num_decodes
            return
        self.steps.sparse_steps += 1
        self.steps.sparse_requests += num_decodes
        rate = self.config.recall_sample_rate
        if rate <= 0.0 or not self._recall_ok:
            return
        self._recall_countdown -= 1
        if self._recall_countdown <= 0:
            self._recall_countdown = max(1, round(1.0 / rate))
            self._recall_layer = self._layers[self._recall_turn % len(self._layers)]
            self._recall_turn += 1

    def _end_step(self) -> None:
        step, self._step = self._step, None
        self._recall_layer = None
        if step is None:
            return
        if not step.whole:
            self.steps.selection_s.observe(step.selection_s)
        if step.staged:
            self.steps.swap_wait_s.observe(step.wait_s)

    def layer_done(self, layer: SparseLayer) -> None:
        """The backend finished a sparse layer of a decode step (the last
        one closes the step's per-step figures)."""
        if layer is self._last:
            self._end_step()

    def recall_due(self, layer: SparseLayer) -> bool:
        """Whether this layer's read this step samples the recall."""
        return layer is self._recall_layer

    def sample_recall(
        self,
        layer: SparseLayer,
        query: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        read: PreparedRead,
    ) -> float:
        """Measure the share of one decode request's exact attention mass
        that this step's selection holds, and record it.

        Args:
            query: ``[num_decodes, num_heads, head_dim]`` the real queries.
            block_table: ``[num_decodes, max_blocks]`` host block ids.
            seq_lens: ``[num_decodes]`` tokens per request.
            read: the layer's prepared read of this step.
        """
        self._recall_layer = None
        reader = self.context.key_reader
        assert reader is not None and layer.host_cache is not None
        row = self._recall_turn % int(seq_lens.shape[0])
        tokens = int(seq_lens[row])
        n_blocks = blocks_for(tokens, self.block_size)
        ids = block_table[row, :n_blocks].long()
        count = int(read.plan.counts[row])
        chosen = read.plan.host_ids[row, :count].long()
        keys = reader(layer.host_cache, ids)[:tokens]
        selected = torch.isin(ids, chosen)
        share = float(
            selected_share(
                query[row], keys, selected, self.block_size, layer.info.scale
            )
        )
        self.steps.recall.observe(share)
        self.steps.last_recall = share
        return share

    # ----------------------------------------------------------------- stats
    def reset_stats(self) -> None:
        """Zero the counters and restart the recall-sampling schedule (the
        next sparse step samples the first sparse layer), so that a window of
        counters does not depend on the steps before it."""
        for layer in self.sparse.values():
            layer.reset_stats()
        self.steps = StepStats()
        self._recall_countdown = 0
        self._recall_turn = 0

    def stats_snapshot(self) -> dict[str, Any]:
        """Counters of this worker, JSON-ready."""
        layers = self._layers
        out = snapshot(layers, staging=not self.in_place)
        out["block_bytes"] = layers[0].block_bytes if layers else 0
        out["staging_peak_blocks"] = (
            0 if self.copier is None else self.copier.staging.peak_blocks
        )
        out["pending_reads"] = sum(layer.pending is not None for layer in layers)
        out["partial_cache_bytes"] = sum(
            0 if layer.partial_cache is None else layer.partial_cache.nbytes
            for layer in layers
        )
        out["residual_sums_bytes"] = sum(
            0 if t is None else t.nbytes
            for layer in layers
            for t in (layer.residual_sums, layer.residual_fill)
        )
        out["host_kv_bytes"] = sum(
            0 if layer.host_cache is None else layer.host_cache.nbytes
            for layer in layers
        )
        for name in POLICIES:
            # Untracked policies report their (empty) metadata too.
            policy = self.policies.get(name) or make_policy(name, self.context)
            out.update(policy.metadata_bytes())
            out.update(policy.stats())
        threshold = self.sparse_min_tokens
        out["sparse_min_tokens"] = float("inf") if threshold == NEVER else threshold
        costs = self.context.step_costs
        out["step_costs"] = None if costs is None else costs.to_dict()
        out["policy"] = self.config.policy
        out["budget"] = self.config.budget
        out["swap_mode"] = self.config.swap_mode
        out["steps"] = self.steps.to_dict()
        # The device tier: partial keys, tracked policies' metadata, staging.
        out["device_tier_bytes"] = (
            out["partial_cache_bytes"]
            + out["residual_sums_bytes"]
            + sum(sum(p.metadata_bytes().values()) for p in self.policies.values())
            + (0 if self.copier is None else self.copier.staging.nbytes())
        )
        return out

    def shutdown(self) -> None:
        if self.copier is not None:
            self.copier.shutdown()


def chooses_ahead(
    policy: BlockPolicy | type[BlockPolicy], query_source: str, in_place: bool
) -> bool:
    """Whether ``policy`` chooses one layer ahead (else at attention) with
    ``query_source``, reading in place or through staging."""
    if not policy.scores_either_way:
        return policy.ahead
    if query_source == "auto":  # lead time only pays where a copy can use it
        return not in_place
    return query_source == "speculated"
