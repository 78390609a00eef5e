"""Methods INFINIGEN adds to vLLM workers (vLLM's ``worker_extension_cls``).

The plugin sets ``parallel_config.worker_extension_cls`` to this class when
INFINIGEN is selected and the user named no extension of their own, so
offline users and benchmarks can read the counters of every worker:

    llm.collective_rpc("infinigen_stats")
    llm.collective_rpc("infinigen_reset_stats")
"""

from __future__ import annotations

from vllm_infinigen.engine.runtime import reset_stats, stats_snapshot


class InfiniGenWorkerExtension:
    """Mixed into the worker class by vLLM."""

    def infinigen_stats(self) -> dict[str, object]:
        """This worker's INFINIGEN counters (empty before set-up)."""
        return stats_snapshot()

    def infinigen_reset_stats(self) -> bool:
        """Zero this worker's INFINIGEN counters."""
        return reset_stats()
