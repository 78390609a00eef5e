"""Calibrating a Hugging Face transformers causal LM on CPU, without vLLM.

For validating the method against a real model. Works for decoder models
laid out like Llama, Qwen2 and Qwen3 in transformers (``model.model.layers[i]
.self_attn.{q_proj, k_proj[, q_norm, k_norm]}``, one ``model.model.
rotary_emb`` producing rotate-half RoPE tables). transformers is not imported
here: the model object is duck-typed.

The attention input ``x`` of each layer (after its input layernorm) is
captured with a forward pre-hook on ``self_attn.q_proj``, the same point the
vLLM engine hooks (``qkv_proj``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .calibration import (
    DEFAULT_OPTIONS,
    AttentionProjection,
    CalibrationOptions,
    LayerCalibrationInput,
    build_speculators,
    fit_layer,
    fit_skews_cached,
)
from .calibration_cache import CalibrationCache, calibration_key, tensor_digest
from .calibration_text import load_calibration_text
from .rotary import apply_neox_rotary
from .speculator import LayerSpeculator

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class HfRotary:
    """:class:`~.rotary.RotaryFn` over a transformers ``rotary_emb`` module.

    ``rotary_emb(x, position_ids[None])`` returns ``cos, sin`` of shape
    ``[1, tokens, head_dim]`` (with any RoPE scaling of the config applied);
    they are applied with the rotate-half convention. Models whose layers use
    different RoPE tables (Gemma 3: ``sliding_attention`` vs
    ``full_attention``) take the layer's type as a third argument.
    """

    rotary_emb: Any
    layer_type: str | None = None

    def __call__(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.layer_type is None:
            cos, sin = self.rotary_emb(x, positions[None, :])
        else:
            cos, sin = self.rotary_emb(x, positions[None, :], self.layer_type)
        return apply_neox_rotary(x, cos[0].float(), sin[0].float())


def decoder_layers(model: Any) -> Sequence[Any]:
    """The decoder layers of a transformers causal LM (``model.model.layers``)."""
    return model.model.layers


def attention_projections(model: Any) -> list[AttentionProjection]:
    """One :class:`AttentionProjection` per decoder layer of ``model``."""
    config = model.config
    num_heads = config.num_attention_heads
    num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
    layer_types = getattr(config, "layer_types", None)
    per_type = layer_types is not None and hasattr(
        model.model.rotary_emb, f"{layer_types[0]}_inv_freq"
    )
    projections = []
    for index, layer in enumerate(decoder_layers(model)):
        attn = layer.self_attn
        layer_type = str(layer_types[index]) if per_type and layer_types else None
        rope = HfRotary(model.model.rotary_emb, layer_type)
        projections.append(
            AttentionProjection(
                q_weight=attn.q_proj.weight.detach(),
                q_bias=None if attn.q_proj.bias is None else attn.q_proj.bias.detach(),
                k_weight=attn.k_proj.weight.detach(),
                k_bias=None if attn.k_proj.bias is None else attn.k_proj.bias.detach(),
                num_heads=num_heads,
                num_kv_heads=num_kv_heads,
                head_dim=head_dim,
                rope=rope,
                q_norm=getattr(attn, "q_norm", None),
                k_norm=getattr(attn, "k_norm", None),
            )
        )
    return projections


def capture_attention_inputs(model: Any, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Run ``model``'s decoder on one sequence, keeping each layer's attention input.

    Only the decoder stack runs (no LM head). Positions are ``0..tokens-1``.

    Args:
        model: a transformers causal LM.
        input_ids: ``[tokens]`` or ``[1, tokens]`` int64.

    Returns:
        Per layer, ``[tokens, hidden]`` (``x`` after the input layernorm), in
        the model's dtype.
    """
    ids = input_ids.reshape(1, -1)
    captured: list[torch.Tensor | None] = [None] * len(decoder_layers(model))

    def make_hook(index: int) -> Any:
        def hook(_module: Any, args: tuple[Any, ...]) -> None:
            captured[index] = args[0].detach()[0].clone()

        return hook

    handles = [
        layer.self_attn.q_proj.register_forward_pre_hook(make_hook(i))
        for i, layer in enumerate(decoder_layers(model))
    ]
    try:
        with torch.no_grad():
            model.model(input_ids=ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i, x in enumerate(captured) if x is None]
    if missing:
        raise RuntimeError(f"no attention input captured for layers {missing}")
    return [x for x in captured if x is not None]


def model_weights_digest(model: Any) -> str:
    """Digest of every parameter and buffer of ``model`` (by name)."""
    named = list(model.state_dict().items())
    return tensor_digest(sorted(named, key=lambda item: item[0]))


def calibrate_hf_model(
    model: Any,
    tokenizer: Any,
    options: CalibrationOptions = DEFAULT_OPTIONS,
    *,
    text: str | None = None,
    cache: CalibrationCache | None = None,
    progress: bool = True,
) -> list[LayerSpeculator]:
    """Calibrate every layer of a transformers causal LM on CPU.

    On CPU load the model in float32: the calibration forward pass in
    bfloat16 is about 9x slower there.

    Args:
        model: Llama/Qwen2/Qwen3-style transformers causal LM.
        tokenizer: its tokenizer.
        options: calibration options.
        text: calibration text; ``None``: the standard library text
            (:func:`~.calibration_text.default_calibration_text`).
        cache: on-disk cache (``None``: none). The key covers all of the
            model's weights, ``options`` and the text.
        progress: show a tqdm bar while fitting.

    Returns:
        One speculator per decoder layer.
    """
    text = load_calibration_text() if text is None else text
    param = next(model.parameters())
    if param.device.type == "cpu" and param.dtype != torch.float32:
        logger.warning(
            "calibrating a %s model on CPU: reduced-precision matmuls are slow on "
            "CPUs without AMX (Qwen2.5-0.5B: 178 s in bfloat16 vs 19 s in float32 "
            "on 2 cores); load it in float32 for calibration",
            param.dtype,
        )
    projections = attention_projections(model)
    key = calibration_key(
        weights_digest=model_weights_digest(model),
        options=options.key_dict(),
        extra=(type(model).__name__, text),
    )
    inputs: list[LayerCalibrationInput] = []

    def fit(index: int) -> Any:
        if not inputs:
            ids = tokenizer(text, return_tensors="pt")["input_ids"][0]
            ids = ids[: options.max_tokens]
            logger.info("calibration: %d tokens", ids.shape[0])
            positions = torch.arange(ids.shape[0])
            xs = capture_attention_inputs(model, ids)
            inputs.extend(
                LayerCalibrationInput(proj, x, positions)
                for proj, x in zip(projections, xs, strict=True)
            )
        return fit_layer(inputs[index], options)

    skews = fit_skews_cached(
        len(projections), fit, cache=cache, key=key, progress=progress
    )
    return build_speculators(projections, skews)
