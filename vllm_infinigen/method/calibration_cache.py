"""On-disk cache of calibrated skews, keyed by checksums.

The cache stores only tensors (the :class:`~.skew.LayerSkew` of each layer),
never callables, so it loads with ``torch.load(weights_only=True)``. The key
is a BLAKE2b digest of: a format version, the weights' digest, the options
and the calibration text (or any other bytes the caller adds). Anything that
changes the result changes the key; stale files are never read, only left.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .skew import LayerSkew

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2
"""Bumped whenever the stored content or the calibration math changes
(2: a digest of the stored tensors, checked on load)."""


def default_cache_dir() -> Path:
    """``$VLLM_INFINIGEN_CACHE/calibration``, else ``~/.cache/vllm-infinigen/...``."""
    root = os.environ.get("VLLM_INFINIGEN_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "vllm-infinigen"
    return base / "calibration"


def tensor_digest(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Hex BLAKE2b digest of names, dtypes, shapes and raw bytes, in order."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in named_tensors:
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def calibration_key(
    *, weights_digest: str, options: Mapping[str, object], extra: Iterable[str] = ()
) -> str:
    """Cache key of one calibration.

    Args:
        weights_digest: from :func:`tensor_digest` over the weights that
            influence the calibration.
        options: JSON-serialisable calibration options.
        extra: further identifying strings (e.g. the calibration text).
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(f"format={CACHE_FORMAT}|weights={weights_digest}|".encode())
    h.update(json.dumps(dict(options), sort_keys=True, default=str).encode())
    for item in extra:
        h.update(b"|")
        h.update(item.encode())
    return h.hexdigest()


class CalibrationCache:
    """A directory of ``<key>.pt`` files, each a list of per-layer skews."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = (
            Path(directory) if directory is not None else default_cache_dir()
        )

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.pt"

    def load(self, key: str) -> list[LayerSkew] | None:
        """The cached skews for ``key``, or ``None`` (missing or unreadable)."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            layers = [
                LayerSkew(skew=entry["skew"], channels=entry["channels"])
                for entry in payload["layers"]
            ]
            problem = ""
            if payload.get("format") != CACHE_FORMAT:
                problem = f"format {payload.get('format')!r}, expected {CACHE_FORMAT}"
            elif payload.get("digest") != _layers_digest(layers):
                problem = "its content does not match its digest"
        except Exception as error:  # a torn or foreign file: recompute, don't fail
            problem = f"unreadable ({type(error).__name__}: {error})"
        if problem:
            logger.warning(
                "calibration cache %s not used, recalibrating: %s", path, problem
            )
            return None
        logger.info("calibration loaded from %s", path)
        return layers

    def save(self, key: str, layers: list[LayerSkew]) -> Path:
        """Store ``layers`` atomically (write to a temp file, then rename)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        payload = {
            "format": CACHE_FORMAT,
            "layers": [{"skew": s.skew, "channels": s.channels} for s in layers],
            "digest": _layers_digest(layers),
        }
        torch.save(payload, tmp)
        tmp.replace(path)
        logger.info("calibration saved to %s", path)
        return path


def _layers_digest(layers: list[LayerSkew]) -> str:
    """Digest of the stored tensors: a file damaged after it was written
    (a flipped byte inside a tensor loads without error) fails it."""
    named = []
    for i, layer in enumerate(layers):
        named += [(f"{i}.skew", layer.skew), (f"{i}.channels", layer.channels)]
    return tensor_digest(named)
