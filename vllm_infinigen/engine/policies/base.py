"""The interface every block-selection policy implements.

A policy turns its evidence into one ``[num_reqs, num_kv_heads, max_blocks]``
float32 score table per sparse layer and decode step (higher is better, log
mass-like units, ``-inf`` past a request's end); the runtime hands it to
:func:`~vllm_infinigen.method.selection.select_blocks`, so at one budget all
policies read the same number of blocks and only the choice differs.

What varies between policies, and what a subclass states:

* when it scores: one layer ahead, from the previous layer's attention input
  (:attr:`BlockPolicy.ahead`; the read can be prepared before the layer
  runs), or at the layer's attention, from its real query;
* what it keeps on the device per sparse layer (:meth:`on_kv_write` keeps it
  current; :meth:`metadata_bytes` reports its size);
* what it observes of attention (:meth:`observe_decode`,
  :meth:`observe_prefill`);
* whether the ``alpha`` threshold applies (:attr:`BlockPolicy.uses_alpha`)
  and whether it reads every block (:attr:`BlockPolicy.reads_everything`).

Policies are per worker; their per-layer state is keyed by layer index. They
import no platform-specific vLLM module: what is platform-specific (reading
keys back out of the host tier) comes in through :class:`PolicyContext`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from vllm_infinigen.method.selection import SelectionPolicy

if TYPE_CHECKING:
    from vllm_infinigen.engine.cost_probe import StepCosts
    from vllm_infinigen.engine.cpu_scoring import PackedWriter
    from vllm_infinigen.engine.layer_state import SparseLayer

KeyReader = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``(host_cache, block_ids [n]) -> keys [n * block_size, num_kv_heads,
head_dim]``: a layer's keys read back from the host tier, in position order."""


@dataclass
class PolicyContext:
    """What a worker offers its policies.

    Attributes:
        block_size: tokens per KV block.
        key_reader: reads keys back from a host-tier cache; ``None`` where the
            platform cannot (a policy that needs it refuses to be tracked).
        key_reader_check: raises a ValueError naming why keys cannot be read
            (``None``: nothing to check).
        sparse_min_tokens: the platform's default for the option of that name
            (decode steps with fewer context tokens read every block).
        block_scorer: a faster implementation of
            :func:`~vllm_infinigen.method.scoring.block_scores` for this
            platform's tensors (same arguments and result), or ``None``.
        packed_writer: a faster implementation of
            :func:`~vllm_infinigen.method.partial_cache.write_partial_keys`
            for caches packed at 4 bits (same arguments and bytes), or
            ``None``.
        step_costs: the decode costs measured on this machine at start-up
            (:mod:`~vllm_infinigen.engine.cost_probe`), from which
            ``sparse_min_tokens`` left unset follows; ``None``: the
            platform's fixed default above.
    """

    block_size: int
    key_reader: KeyReader | None = None
    key_reader_check: Callable[[], None] | None = None
    sparse_min_tokens: int = 0
    block_scorer: Callable[..., torch.Tensor] | None = None
    packed_writer: PackedWriter | None = None
    step_costs: StepCosts | None = None


class BlockPolicy:
    """One selection policy. Every hook has a neutral default; a subclass
    overrides what it uses (a policy that scores ahead overrides
    :meth:`scores_ahead`, one that scores at attention
    :meth:`scores_at_attention`)."""

    name: ClassVar[str]
    ahead: ClassVar[bool] = True
    """Scores one layer ahead (:meth:`scores_ahead`); False: at the layer's
    attention (:meth:`scores_at_attention`)."""
    scores_either_way: ClassVar[bool] = False
    """Implements both :meth:`scores_ahead` and :meth:`scores_at_attention`
    (the ``query_source`` option chooses)."""
    uses_layer_input: ClassVar[bool] = False
    """:meth:`scores_ahead` reads the previous layer's attention input
    ``x`` (else ``x`` may be ``None``: a compiled model has no pre-hook to
    hand it over)."""
    uses_alpha: ClassVar[bool] = False
    """The ``alpha`` threshold prunes candidates; False: pure top-k."""
    reads_everything: ClassVar[bool] = False
    """Every block is read at every step (no scoring at all)."""
    observes_attention: ClassVar[bool] = False
    """:meth:`observe_decode` / :meth:`observe_prefill` want to be called."""

    def __init__(self, context: PolicyContext) -> None:
        self.context = context

    # ------------------------------------------------------------ lifecycle
    def check_supported(self) -> None:
        """Raise a ValueError naming the policy if this worker cannot run it
        (called before the policy is tracked)."""

    def start_run(self) -> None:
        """Options changed between requests: forget what the previous runs
        observed (their decode-time evidence) but keep what prefill gave."""

    # ------------------------------------------------------- device metadata
    def on_kv_write(
        self,
        layer: SparseLayer,
        key: torch.Tensor,
        slots: torch.Tensor,
        fresh_blocks: torch.Tensor,
    ) -> None:
        """New tokens' post-RoPE keys (``[tokens, num_kv_heads, head_dim]``)
        were written at ``slots`` (valid slots only); ``fresh_blocks`` are the
        blocks written from their first slot (new to their request)."""

    def metadata_bytes(self) -> dict[str, int]:
        """Bytes of device metadata this policy keeps, by counter name."""
        return {}

    def stats(self) -> dict[str, float]:
        """Extra JSON-ready counters of the policy."""
        return {}

    # --------------------------------------------------------------- scoring
    def scores_ahead(
        self,
        layer: SparseLayer,
        x: torch.Tensor | None,
        table: torch.Tensor,
        seq_lens: torch.Tensor,
        selection: SelectionPolicy,
    ) -> torch.Tensor:
        """Scores from the previous layer's attention input ``x``
        (``[num_decodes, hidden]``; ``None`` unless :attr:`uses_layer_input`);
        ``table``: ``[num_decodes, width]``."""
        raise NotImplementedError(f"policy {self.name!r} does not score ahead")

    def scores_at_attention(
        self,
        layer: SparseLayer,
        query: torch.Tensor,
        table: torch.Tensor,
        seq_lens: torch.Tensor,
        selection: SelectionPolicy,
    ) -> torch.Tensor:
        """Scores from the layer's real decode queries
        (``[num_decodes, num_heads, head_dim]``)."""
        raise NotImplementedError(f"policy {self.name!r} does not score at attention")

    # ----------------------------------------------------------- observation
    def observe_decode(
        self,
        layer: SparseLayer,
        query: torch.Tensor,
        host_ids: torch.Tensor,
        counts: torch.Tensor,
        sparse_seq_lens: torch.Tensor,
    ) -> None:
        """Decode queries (``[num_decodes, num_heads, head_dim]``) read the
        blocks ``host_ids[r, :counts[r]]`` (``sparse_seq_lens[r]`` tokens).
        Called only while this policy is the active one: :meth:`start_run`
        clears decode-time evidence whenever options change."""

    def observe_prefill(
        self,
        layer: SparseLayer,
        query: torch.Tensor,
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        block_table: torch.Tensor,
        rows: list[int],
    ) -> None:
        """Prefill rows ``rows`` of the batch attended their whole context
        (called for every tracked policy, active or not)."""


def tensor_bytes(tensors: dict[int, torch.Tensor]) -> int:
    """Bytes held by a dict of tensors."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
