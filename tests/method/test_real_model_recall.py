"""InfiniGen speculation on Qwen2.5-Coder-0.5B's real attention (transformers, CPU).

Calibrates on the default calibration text (standard library source),
evaluates on a different text (the book excerpt in ``../shared/data``): for
the last 8 tokens of a 1536-token prompt, each layer L >= 1 speculates its
query from layer L-1's attention input, scores 16-token blocks through a
permuted paged partial key cache and selects blocks with the default policy.
Recall = the share of the true attention mass (real query, all keys, averaged
over query heads) inside the selected blocks.

The floors come from ``benchmarks/results/recall.json`` (full run, 16
positions; see docs/method.md).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.conftest import SHARED_DATA
from vllm_infinigen.method import hf_model
from vllm_infinigen.method.calibration import (
    DEFAULT_OPTIONS,
    CalibrationOptions,
    LayerCalibrationInput,
    calibrate_layers,
)
from vllm_infinigen.method.calibration_text import default_calibration_text
from vllm_infinigen.method.recall import LayerRecall, RecallInputs, evaluate_recall
from vllm_infinigen.method.selection import SelectionPolicy

MODEL = "qwen2.5-coder-0.5b"
EVAL_TOKENS = 1536
POSITIONS = 8
BLOCK_SIZE = 16

pytestmark = pytest.mark.slow


def _model_dir() -> Any:
    from vllm_infinigen.models import is_built, model_path

    if not is_built(MODEL):
        pytest.skip(
            f"{MODEL} is not built at {model_path(MODEL)} "
            "(python -m vllm_infinigen.models build qwen2.5-coder-0.5b)"
        )
    return model_path(MODEL)


def _mean(per_layer: dict[int, LayerRecall], field: str) -> float:
    values = [float(getattr(r, field).mean()) for r in per_layer.values()]
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def measured() -> dict[str, dict[int, LayerRecall]]:
    transformers = pytest.importorskip("transformers")
    path = _model_dir()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    projections = hf_model.attention_projections(model)

    calib_ids = tok(default_calibration_text(), return_tensors="pt")["input_ids"][0]
    calib_ids = calib_ids[: DEFAULT_OPTIONS.max_tokens]
    calib_pos = torch.arange(calib_ids.shape[0])
    calib_inputs = [
        LayerCalibrationInput(p, x, calib_pos)
        for p, x in zip(
            projections,
            hf_model.capture_attention_inputs(model, calib_ids),
            strict=True,
        )
    ]
    book = (SHARED_DATA / "pg19_firstbook.txt").read_text(encoding="utf-8")
    eval_ids = tok(book, return_tensors="pt")["input_ids"][0][:EVAL_TOKENS]
    assert eval_ids.shape[0] == EVAL_TOKENS
    positions = torch.arange(EVAL_TOKENS - POSITIONS, EVAL_TOKENS)
    inputs = RecallInputs.from_attention_inputs(
        projections, hf_model.capture_attention_inputs(model, eval_ids), positions
    )
    policy = SelectionPolicy()
    # The paper's estimate: partial channels only (skewing is what it relies on).
    partial_only = SelectionPolicy(residual=False)
    out = {}
    for name, options, chosen in (
        ("default", DEFAULT_OPTIONS, policy),
        ("no_residual", DEFAULT_OPTIONS, partial_only),
        ("skew_r0.2", CalibrationOptions(partial_ratio=0.2), partial_only),
        (
            "noskew_r0.2",
            CalibrationOptions(partial_ratio=0.2, skew=False),
            partial_only,
        ),
    ):
        speculators = calibrate_layers(calib_inputs, options, progress=False)
        out[name] = evaluate_recall(speculators, inputs, chosen, BLOCK_SIZE)
    return out


def test_speculation_recalls_most_attention_mass(
    measured: dict[str, dict[int, LayerRecall]],
) -> None:
    result = measured["default"]
    assert sorted(result) == list(range(1, 24))  # layer 0 runs dense
    # Default budget: 20% of each request's blocks, rounded up (sink and
    # newest block included): 20.8% for 95-96 blocks.
    assert _mean(result, "fraction") <= 0.21
    recall = _mean(result, "method")
    # Full run (16 positions): 0.822, oracle 0.861, random 0.202, worst layer
    # 0.668. Floors leave ~0.04 for the noise of 8 positions; random
    # selection of the same size is ~0.6 below them.
    assert recall >= 0.78
    assert _mean(result, "random") <= 0.3
    assert recall >= 0.9 * _mean(result, "oracle")
    assert min(float(r.method.mean()) for r in result.values()) >= 0.55


def test_residual_block_means_improve_recall(
    measured: dict[str, dict[int, LayerRecall]],
) -> None:
    # Full run (16 positions, recall.py --study selection): 0.830 with the
    # residual term against 0.816 without, the same positions and blocks.
    gain = _mean(measured["default"], "method") - _mean(
        measured["no_residual"], "method"
    )
    assert gain >= 0.005, gain


def test_skewing_improves_recall(measured: dict[str, dict[int, LayerRecall]]) -> None:
    # Full run at partial ratio 0.2: 0.801 skewed vs 0.760 unskewed (+0.041).
    skewed = _mean(measured["skew_r0.2"], "method")
    assert skewed >= _mean(measured["noskew_r0.2"], "method") + 0.02
