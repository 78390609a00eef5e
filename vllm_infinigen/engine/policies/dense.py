"""Dense: every block, every step (the exact baseline on the engine's path)."""

from __future__ import annotations

from .base import BlockPolicy


class DensePolicy(BlockPolicy):
    name = "dense"
    reads_everything = True
