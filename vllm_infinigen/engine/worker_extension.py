"""Methods INFINIGEN adds to vLLM workers (vLLM's ``worker_extension_cls``).

The plugin sets ``parallel_config.worker_extension_cls`` to this class when
INFINIGEN is selected and the user named no extension of their own, so
offline users and benchmarks can reach the runtime of every worker:

    llm.collective_rpc("infinigen_stats")
    llm.collective_rpc("infinigen_reset_stats")
    llm.collective_rpc("infinigen_track", args=(["quest", "h2o"],))
    llm.collective_rpc("infinigen_configure", args=({"policy": "quest"},))
    llm.collective_rpc("infinigen_options")

``infinigen_track`` starts maintaining other policies' device metadata (so
prompts prefilled once serve every policy from the prefix cache);
``infinigen_configure`` switches policy or budget between requests. The
runtime lives on the worker's model runner (``patches/model_load.py``).
"""

from __future__ import annotations

from typing import Any

from vllm_infinigen.engine.runtime import InfiniGenRuntime
from vllm_infinigen.patches.model_load import RUNTIME_ATTR


def _runtime(worker: Any) -> InfiniGenRuntime | None:
    return getattr(getattr(worker, "model_runner", None), RUNTIME_ATTR, None)


def _required(worker: Any) -> InfiniGenRuntime:
    runtime = _runtime(worker)
    if runtime is None:
        raise RuntimeError("INFINIGEN is not set up in this worker")
    return runtime


class InfiniGenWorkerExtension:
    """Mixed into the worker class by vLLM."""

    def infinigen_stats(self) -> dict[str, object]:
        """This worker's INFINIGEN counters (empty before set-up)."""
        runtime = _runtime(self)
        return {} if runtime is None else runtime.stats_snapshot()

    def infinigen_reset_stats(self) -> bool:
        """Zero this worker's INFINIGEN counters."""
        runtime = _runtime(self)
        if runtime is not None:
            runtime.reset_stats()
        return True

    def infinigen_configure(self, options: dict[str, Any]) -> dict[str, Any]:
        """Change selection options (policy, budget, ...) between requests;
        returns the effective options."""
        return _required(self).reconfigure(options)

    def infinigen_track(self, policies: list[str]) -> list[str]:
        """Maintain these policies' device metadata from now on."""
        return _required(self).track(policies)

    def infinigen_options(self) -> dict[str, Any]:
        """This worker's effective options (changes nothing)."""
        return _required(self).config.to_dict()
