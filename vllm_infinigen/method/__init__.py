"""The InfiniGen method as pure PyTorch functions (no vLLM import).

Offline: :func:`fit_layer_skew` / :func:`calibrate_layers` (or
:func:`calibrate_hf_model`) turn calibration queries and keys into one frozen
:class:`LayerSpeculator` per layer. Every decode step, per InfiniGen layer L:
:meth:`LayerSpeculator.speculate` (on layer L-1's attention input) ->
:func:`block_scores` (against the paged partial key cache) ->
:func:`select_blocks` -> :func:`selected_block_ids` and
:func:`count_selected_blocks`. New keys enter the partial key cache through
:meth:`LayerSpeculator.partial_keys` and :func:`write_partial_keys`.
"""

from .calibration import (
    AttentionProjection,
    CalibrationOptions,
    LayerCalibrationInput,
    build_speculators,
    calibrate_layers,
    fit_layer,
)
from .calibration_cache import CalibrationCache, calibration_key, tensor_digest
from .calibration_text import default_calibration_text, load_calibration_text
from .counters import count_selected_blocks, new_selection_counters
from .partial_cache import new_partial_key_cache, write_partial_keys
from .rotary import HeadNormFn, NeoxRotary, RotaryFn
from .scoring import BlockScoreRule, block_scores
from .selection import (
    PAD,
    BlockSelection,
    HeadReduction,
    SelectionPolicy,
    num_blocks_of,
    select_blocks,
    selected_block_ids,
    selection_from_mask,
    valid_blocks,
)
from .skew import (
    ChannelCriterion,
    LayerSkew,
    compute_skew,
    fit_layer_skew,
    fold_skew_into_projection,
    partial_dim,
)
from .speculator import LayerSpeculator

__all__ = [
    "PAD",
    "AttentionProjection",
    "BlockScoreRule",
    "BlockSelection",
    "CalibrationCache",
    "CalibrationOptions",
    "ChannelCriterion",
    "HeadNormFn",
    "HeadReduction",
    "LayerCalibrationInput",
    "LayerSkew",
    "LayerSpeculator",
    "NeoxRotary",
    "RotaryFn",
    "SelectionPolicy",
    "block_scores",
    "build_speculators",
    "calibrate_layers",
    "calibration_key",
    "compute_skew",
    "count_selected_blocks",
    "default_calibration_text",
    "fit_layer",
    "fit_layer_skew",
    "fold_skew_into_projection",
    "load_calibration_text",
    "new_partial_key_cache",
    "new_selection_counters",
    "num_blocks_of",
    "partial_dim",
    "select_blocks",
    "selected_block_ids",
    "selection_from_mask",
    "tensor_digest",
    "valid_blocks",
    "write_partial_keys",
]
