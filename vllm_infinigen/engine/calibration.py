"""Calibration at model load: skew matrices and partial channels per layer.

Runs (or loads from the on-disk cache) the method library's calibration on
the model's own weights, read from the model folder vLLM loaded, with a
Hugging Face transformers forward over the calibration text on CPU. The
result is cached keyed by a checksum of the weights, the options and the
text, so only the first start of a model pays for it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from vllm.logger import init_logger

from vllm_infinigen.config import InfiniGenConfig
from vllm_infinigen.method.calibration import CalibrationOptions
from vllm_infinigen.method.calibration_cache import CalibrationCache
from vllm_infinigen.method.calibration_text import load_calibration_text
from vllm_infinigen.method.hf_model import calibrate_hf_model
from vllm_infinigen.method.skew import ChannelCriterion
from vllm_infinigen.method.speculator import LayerSpeculator

logger = init_logger("vllm.infinigen.calibration")


def calibrate_model(
    model_path: str, config: InfiniGenConfig, layers: list[int]
) -> dict[int, LayerSpeculator]:
    """Speculators for ``layers`` of the model at ``model_path``.

    Args:
        model_path: the Hugging Face folder vLLM serves.
        config: our options (``partial_ratio``, ``partial_channels``,
            ``calibration_file``).
        layers: indices of the sparse layers.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    if not Path(model_path).is_dir():
        raise ValueError(
            f"INFINIGEN calibration needs a local model folder; {model_path!r} "
            "is not a directory"
        )
    if config.partial_ratio is None:
        raise ValueError(
            "INFINIGEN calibration needs 'partial_ratio' chosen for the model "
            "(InfiniGenConfig.for_model)"
        )
    text = load_calibration_text(config.calibration_file)
    cache = CalibrationCache()
    cache.directory.mkdir(parents=True, exist_ok=True)
    # Tensor-parallel ranks (and engines started together) calibrate one at a
    # time: the first fills the cache, the others load from it.
    with FileLock(str(cache.directory / "calibration.lock")):
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        model: Any = AutoModelForCausalLM.from_pretrained(
            model_path, dtype=torch.float32, low_cpu_mem_usage=True
        )
        model.eval()
        options = CalibrationOptions(
            partial_ratio=config.partial_ratio,
            criterion=ChannelCriterion(config.partial_channels),
        )
        speculators = calibrate_hf_model(
            model, tokenizer, options, text=text, cache=cache, progress=True
        )
        chosen = {i: speculators[i] for i in layers}
        del model
    logger.info(
        "INFINIGEN calibration ready for %d layers in %.1f s (d_partial=%d)",
        len(chosen),
        time.perf_counter() - start,
        next(iter(chosen.values())).d_partial if chosen else 0,
    )
    return chosen
