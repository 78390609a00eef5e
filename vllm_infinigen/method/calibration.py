"""Offline calibration: per-layer skews from captured attention inputs.

Engine independent. The caller supplies, per layer, the attention input
``x`` (after the layer's input layernorm) on a calibration text and the
layer's projection (:class:`AttentionProjection`); calibration recomputes the
post-RoPE queries and keys from them, fits the skew and channels
(:func:`~.skew.fit_layer_skew`) and returns one frozen
:class:`~.speculator.LayerSpeculator` per layer. Results are cached on disk
(:mod:`.calibration_cache`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from vllm_infinigen.config import PARTIAL_RATIO

from .calibration_cache import CalibrationCache, calibration_key, tensor_digest
from .rotary import HeadNormFn, RotaryFn
from .skew import ChannelCriterion, LayerSkew, fit_layer_skew, partial_dim
from .speculator import LayerSpeculator

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CalibrationOptions:
    """What calibration computes (all fields are part of the cache key).

    Attributes:
        partial_ratio: share of ``head_dim`` kept as partial channels, in
            ``(0, 1]``; ``d_partial = ceil(ratio * head_dim)``.
        criterion: partial channel ranking (|Q A| or |Q A| * |K A|).
        skew: ``False``: identity basis (the ablation without skewing).
        max_tokens: calibration tokens used (the text is truncated).
    """

    partial_ratio: float = PARTIAL_RATIO
    criterion: ChannelCriterion = ChannelCriterion.QUERY
    skew: bool = True
    max_tokens: int = 2048

    def __post_init__(self) -> None:
        partial_dim(64, self.partial_ratio)  # validates the ratio
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    def key_dict(self) -> dict[str, object]:
        """JSON-ready form for the cache key."""
        out = asdict(self)
        out["criterion"] = self.criterion.value
        return out


DEFAULT_OPTIONS = CalibrationOptions()
"""The default calibration options (see docs/method.md for their source)."""


@dataclass(frozen=True, eq=False)
class AttentionProjection:
    """The query/key side of one attention layer.

    Attributes:
        q_weight: ``[num_heads * head_dim, hidden]``.
        q_bias: ``[num_heads * head_dim]`` or ``None``.
        k_weight: ``[num_kv_heads * head_dim, hidden]``.
        k_bias: ``[num_kv_heads * head_dim]`` or ``None``.
        num_heads, num_kv_heads, head_dim: attention geometry.
        rope: rotary embedding (``None``: the model has none, e.g. OPT).
        q_norm, k_norm: per-head norms applied before RoPE (Qwen3, Gemma 3).
    """

    q_weight: torch.Tensor
    q_bias: torch.Tensor | None
    k_weight: torch.Tensor
    k_bias: torch.Tensor | None
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RotaryFn | None = None
    q_norm: HeadNormFn | None = None
    k_norm: HeadNormFn | None = None

    def _project(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        heads: int,
        norm: HeadNormFn | None,
    ) -> torch.Tensor:
        y = torch.nn.functional.linear(x.to(weight.dtype), weight, bias)
        y = y.view(x.shape[0], heads, self.head_dim)
        if norm is not None:
            y = norm(y)
        if self.rope is not None:
            y = self.rope(positions, y)
        return y

    def queries(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x: [tokens, hidden]`` -> post-RoPE ``[tokens, num_heads, head_dim]``."""
        return self._project(
            x, positions, self.q_weight, self.q_bias, self.num_heads, self.q_norm
        )

    def keys(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x: [tokens, hidden]`` -> post-RoPE ``[tokens, num_kv_heads, head_dim]``."""
        return self._project(
            x, positions, self.k_weight, self.k_bias, self.num_kv_heads, self.k_norm
        )

    def named_weights(self, prefix: str) -> list[tuple[str, torch.Tensor]]:
        """The tensors of this projection, named, for :func:`tensor_digest`."""
        named = [
            (f"{prefix}.q_weight", self.q_weight),
            (f"{prefix}.k_weight", self.k_weight),
        ]
        if self.q_bias is not None:
            named.append((f"{prefix}.q_bias", self.q_bias))
        if self.k_bias is not None:
            named.append((f"{prefix}.k_bias", self.k_bias))
        return named


@dataclass(frozen=True, eq=False)
class LayerCalibrationInput:
    """One layer's projection and its attention input on the calibration text.

    Attributes:
        projection: the layer's query/key projection.
        x: ``[tokens, hidden]`` attention input after the input layernorm.
        positions: ``[tokens]`` int64 positions of ``x``'s tokens.
    """

    projection: AttentionProjection
    x: torch.Tensor
    positions: torch.Tensor


def fit_layer(inp: LayerCalibrationInput, options: CalibrationOptions) -> LayerSkew:
    """Skew and channels of one layer from its calibration input.

    Uses the first ``options.max_tokens`` tokens; queries and keys are
    computed in float32.
    """
    x = inp.x[: options.max_tokens]
    positions = inp.positions[: options.max_tokens]
    proj = inp.projection
    with torch.no_grad():
        q = proj.queries(x, positions).float()
        k = proj.keys(x, positions).float()
    return fit_layer_skew(
        q,
        k,
        partial_ratio=options.partial_ratio,
        criterion=options.criterion,
        skew=options.skew,
    )


def build_speculators(
    projections: Sequence[AttentionProjection], skews: Sequence[LayerSkew]
) -> list[LayerSpeculator]:
    """One :class:`LayerSpeculator` per layer from its projection and skew."""
    if len(projections) != len(skews):
        raise ValueError(f"{len(projections)} projections but {len(skews)} skews")
    return [
        LayerSpeculator.build(
            skew,
            q_weight=proj.q_weight,
            q_bias=proj.q_bias,
            num_heads=proj.num_heads,
            rope=proj.rope,
            q_norm=proj.q_norm,
        )
        for proj, skew in zip(projections, skews, strict=True)
    ]


def fit_skews_cached(
    num_layers: int,
    fit: Callable[[int], LayerSkew],
    *,
    cache: CalibrationCache | None,
    key: str,
    progress: bool = True,
) -> list[LayerSkew]:
    """Load the skews for ``key`` from ``cache`` or compute them with ``fit``.

    Args:
        num_layers: layers to fit.
        fit: ``layer_index -> LayerSkew``; called only on a cache miss.
        cache: where to look and store (``None``: no caching).
        key: the cache key (:func:`~.calibration_cache.calibration_key`).
        progress: show a tqdm bar while fitting.
    """
    if cache is not None:
        cached = cache.load(key)
        if cached is not None and len(cached) == num_layers:
            return cached
    layers = [
        fit(i)
        for i in tqdm(
            range(num_layers),
            desc="InfiniGen calibration",
            unit="layer",
            disable=not progress,
        )
    ]
    if cache is not None:
        cache.save(key, layers)
    return layers


def calibrate_layers(
    inputs: Sequence[LayerCalibrationInput],
    options: CalibrationOptions = DEFAULT_OPTIONS,
    *,
    cache: CalibrationCache | None = None,
    progress: bool = True,
) -> list[LayerSpeculator]:
    """Calibrate every layer from its captured attention input.

    The cache key covers the projection weights, the calibration inputs
    ``x`` (which stand for the text and every earlier weight) and
    ``options``.

    Args:
        inputs: per layer, in layer order.
        options: calibration options.
        cache: on-disk cache, or ``None``.
        progress: show a tqdm bar.

    Returns:
        One speculator per entry of ``inputs``.
    """
    named: list[tuple[str, torch.Tensor]] = []
    for i, inp in enumerate(inputs):
        named += inp.projection.named_weights(f"layer{i}")
        named += [
            (f"layer{i}.x", inp.x[: options.max_tokens]),
            (f"layer{i}.pos", inp.positions[: options.max_tokens]),
        ]
    key = calibration_key(
        weights_digest=tensor_digest(named), options=options.key_dict()
    )
    skews = fit_skews_cached(
        len(inputs),
        lambda i: fit_layer(inputs[i], options),
        cache=cache,
        key=key,
        progress=progress,
    )
    return build_speculators([inp.projection for inp in inputs], skews)
