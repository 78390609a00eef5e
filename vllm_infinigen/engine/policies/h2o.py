"""H2O: blocks by the attention mass they have received, plus a recent window.

Device metadata per sparse layer: ``[num_blocks, num_kv_heads]`` float32
accumulated mass, and the part of it prefill gave (restored when options
change between requests, so runs do not leak into each other). vLLM's CPU
kernel returns no attention weights, so the policy recomputes them for the
rows it observes from keys read back out of the host tier (the platform's
:class:`~.base.PolicyContext` key reader):

* decode rows add their query's mass over the blocks they read;
* a prefill chunk adds the mass of :data:`H2O_PREFILL_ROWS` evenly spaced
  query rows (its last included) over the whole context, which keeps
  prefill's extra cost linear in the context. Rows of the chunk's last block
  go to the live mass only: the prefix cache always recomputes a prompt's
  last block, and the request that does adds those rows again, so the
  restored prefill mass counts every prompt row once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vllm_infinigen.method.policies import attention_block_mass, h2o_block_scores
from vllm_infinigen.method.selection import SelectionPolicy, num_blocks_of

from .base import BlockPolicy, PolicyContext, tensor_bytes

if TYPE_CHECKING:
    from vllm_infinigen.engine.layer_state import SparseLayer

#: Query rows of each prefill chunk whose attention mass is accumulated
#: (evenly spaced, the chunk's last row included).
H2O_PREFILL_ROWS = 16


class H2OPolicy(BlockPolicy):
    name = "h2o"
    observes_attention = True

    def __init__(self, context: PolicyContext) -> None:
        super().__init__(context)
        self.mass: dict[int, torch.Tensor] = {}
        """Per layer ``[num_blocks, num_kv_heads]`` accumulated mass."""
        self.prefill_mass: dict[int, torch.Tensor] = {}
        """Per layer: the part of :attr:`mass` prefill queries gave."""

    def check_supported(self) -> None:
        if self.context.key_reader is None:
            raise ValueError(
                "infinigen option 'policy' h2o needs the host tier's keys, which "
                "this platform cannot read back"
            )
        if self.context.key_reader_check is not None:
            self.context.key_reader_check()

    def start_run(self) -> None:
        with torch.inference_mode():  # the tensors were made in a forward
            for index, mass in self.mass.items():
                mass.copy_(self.prefill_mass[index])

    def _layer_mass(self, layer: SparseLayer, device: torch.device) -> torch.Tensor:
        mass = self.mass.get(layer.index)
        if mass is None:
            assert layer.partial_cache is not None
            shape = (layer.partial_cache.shape[0], layer.num_kv_heads)
            mass = self.mass[layer.index] = torch.zeros(shape, device=device)
            self.prefill_mass[layer.index] = torch.zeros(shape, device=device)
        return mass

    def on_kv_write(
        self,
        layer: SparseLayer,
        key: torch.Tensor,
        slots: torch.Tensor,
        fresh_blocks: torch.Tensor,
    ) -> None:
        self._layer_mass(layer, key.device).index_fill_(0, fresh_blocks, 0.0)
        self.prefill_mass[layer.index].index_fill_(0, fresh_blocks, 0.0)

    def metadata_bytes(self) -> dict[str, int]:
        return {
            "h2o_mass_bytes": tensor_bytes(self.mass) + tensor_bytes(self.prefill_mass)
        }

    def stats(self) -> dict[str, float]:
        return {
            "h2o_prefill_mass": float(
                sum(float(t.sum()) for t in self.prefill_mass.values())
            )
        }

    def scores_ahead(
        self,
        layer: SparseLayer,
        x: torch.Tensor | None,
        table: torch.Tensor,
        seq_lens: torch.Tensor,
        selection: SelectionPolicy,
    ) -> torch.Tensor:
        mass = self._layer_mass(layer, table.device)
        return h2o_block_scores(
            mass, table, seq_lens, self.context.block_size, selection
        )

    def _read(self, layer: SparseLayer, ids: torch.Tensor) -> torch.Tensor:
        reader = self.context.key_reader
        assert reader is not None and layer.host_cache is not None
        return reader(layer.host_cache, ids)

    def observe_decode(
        self,
        layer: SparseLayer,
        query: torch.Tensor,
        host_ids: torch.Tensor,
        counts: torch.Tensor,
        sparse_seq_lens: torch.Tensor,
    ) -> None:
        mass = self.mass.get(layer.index)
        if mass is None:
            return
        block_size = self.context.block_size
        for r, (count, length) in enumerate(
            zip(counts.tolist(), sparse_seq_lens.tolist(), strict=True)
        ):
            ids = host_ids[r, :count]
            position = torch.tensor([length - 1], device=query.device)
            got = attention_block_mass(
                query[r : r + 1],
                self._read(layer, ids),
                position,
                length,
                block_size,
                layer.info.scale,
            )
            mass.index_add_(0, ids.long(), got)

    def observe_prefill(
        self,
        layer: SparseLayer,
        query: torch.Tensor,
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        block_table: torch.Tensor,
        rows: list[int],
    ) -> None:
        mass = self.mass.get(layer.index)
        if mass is None:
            return
        block_size = self.context.block_size
        for r in rows:
            begin, end = int(query_start_loc[r]), int(query_start_loc[r + 1])
            seq_len = int(seq_lens[r])
            query_len = end - begin
            picks = (
                torch.linspace(0, query_len - 1, min(query_len, H2O_PREFILL_ROWS))
                .round()
                .long()
                .unique()
            )
            positions = seq_len - query_len + picks
            n_blocks = int(num_blocks_of(seq_lens[r : r + 1], block_size)[0])
            ids = block_table[r, :n_blocks].long()
            keys = self._read(layer, ids)
            tail = positions >= (seq_len - 1) // block_size * block_size
            for part, to_prefill in ((~tail, True), (tail, False)):
                if not bool(part.any()):
                    continue
                got = attention_block_mass(
                    query[begin + picks[part]],
                    keys,
                    positions[part],
                    seq_len,
                    block_size,
                    layer.info.scale,
                )
                mass.index_add_(0, ids, got)
                if to_prefill:
                    self.prefill_mass[layer.index].index_add_(0, ids, got)
