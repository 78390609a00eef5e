"""Calibration: text, cache, per-layer fitting and the transformers helper."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from vllm_infinigen.method import calibration, hf_model
from vllm_infinigen.method.calibration import (
    AttentionProjection,
    CalibrationOptions,
    LayerCalibrationInput,
    calibrate_layers,
)
from vllm_infinigen.method.calibration_cache import (
    CalibrationCache,
    calibration_key,
    tensor_digest,
)
from vllm_infinigen.method.calibration_text import (
    STDLIB_CALIBRATION_MODULES,
    default_calibration_text,
    load_calibration_text,
)
from vllm_infinigen.method.rotary import NeoxRotary
from vllm_infinigen.method.skew import ChannelCriterion, LayerSkew

transformers = pytest.importorskip("transformers")


def test_default_text_is_stdlib_source_and_stable() -> None:
    text = default_calibration_text()
    assert text == default_calibration_text()
    assert text.startswith("# heapq.py\n")
    found = [name for name in STDLIB_CALIBRATION_MODULES if f"# {name}\n" in text]
    assert len(found) == len(STDLIB_CALIBRATION_MODULES)
    assert 20_000 < len(text) < 40_000


def test_load_calibration_text_reads_a_user_file(tmp_path: Any) -> None:
    path = tmp_path / "calib.txt"
    path.write_text("hello calibration", encoding="utf-8")
    assert load_calibration_text(path) == "hello calibration"
    assert load_calibration_text(None) == default_calibration_text()


def test_options_validate() -> None:
    with pytest.raises(ValueError, match="partial_ratio"):
        CalibrationOptions(partial_ratio=0.0)
    with pytest.raises(ValueError, match="max_tokens"):
        CalibrationOptions(max_tokens=0)
    assert CalibrationOptions().key_dict()["criterion"] == "query"


def test_cache_key_depends_on_weights_options_and_text() -> None:
    w = [("a", torch.ones(3)), ("b", torch.zeros(2, 2))]
    digest = tensor_digest(w)
    assert digest == tensor_digest([("a", torch.ones(3)), ("b", torch.zeros(2, 2))])
    assert digest != tensor_digest([("a", torch.ones(3)), ("b", torch.zeros(4))])
    assert digest != tensor_digest([("a", torch.ones(3) * 2), ("b", torch.zeros(2, 2))])
    opts = CalibrationOptions().key_dict()
    base = calibration_key(weights_digest=digest, options=opts, extra=["text"])
    other_opts = CalibrationOptions(criterion=ChannelCriterion.QUERY_KEY).key_dict()
    assert base != calibration_key(
        weights_digest=digest, options=other_opts, extra=["text"]
    )
    assert base != calibration_key(weights_digest=digest, options=opts, extra=["txt"])
    assert base != calibration_key(
        weights_digest="0" * 32, options=opts, extra=["text"]
    )
    assert base == calibration_key(weights_digest=digest, options=opts, extra=["text"])


def test_cache_round_trip_and_corrupt_file(tmp_path: Any) -> None:
    cache = CalibrationCache(tmp_path)
    layers = [
        LayerSkew(
            skew=torch.eye(4).expand(2, 4, 4).clone(), channels=torch.tensor([[0], [3]])
        )
    ]
    assert cache.load("k") is None
    cache.save("k", layers)
    loaded = cache.load("k")
    assert loaded is not None and len(loaded) == 1
    assert torch.equal(loaded[0].skew, layers[0].skew)
    assert torch.equal(loaded[0].channels, layers[0].channels)
    cache.path("bad").write_bytes(b"not a torch file")
    assert cache.load("bad") is None


def test_damaged_cache_file_is_recalibrated_with_a_warning(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A truncated file, and one with a byte changed inside a tensor (which
    still loads), are never used: load warns and returns None, so
    calibration runs again and overwrites them."""
    cache = CalibrationCache(tmp_path)
    skew = torch.linalg.qr(
        torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(3))
    )[0]
    layers = [
        LayerSkew(skew=skew.contiguous(), channels=torch.tensor([[1, 5], [0, 7]]))
    ]
    path = cache.save("k", layers)
    data = path.read_bytes()

    path.write_bytes(data[: len(data) // 2])
    with caplog.at_level("WARNING"):
        assert cache.load("k") is None
    assert "not used, recalibrating" in caplog.text

    # Flip one byte of the skew's float data: find it by its bytes.
    raw = skew.contiguous().numpy().tobytes()
    at = data.index(raw[:16]) + 5
    damaged = bytearray(data)
    damaged[at] ^= 0x40
    path.write_bytes(bytes(damaged))
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert cache.load("k") is None
    assert "does not match its digest" in caplog.text

    path.write_bytes(data)  # intact again: used
    loaded = cache.load("k")
    assert loaded is not None and torch.equal(loaded[0].skew, skew)


def _synthetic_inputs(num_layers: int = 3) -> list[LayerCalibrationInput]:
    g = torch.Generator().manual_seed(0)
    inputs = []
    for _ in range(num_layers):
        proj = AttentionProjection(
            q_weight=torch.randn(4 * 8, 16, generator=g),
            q_bias=torch.randn(32, generator=g),
            k_weight=torch.randn(2 * 8, 16, generator=g),
            k_bias=None,
            num_heads=4,
            num_kv_heads=2,
            head_dim=8,
            rope=NeoxRotary(8),
        )
        inputs.append(
            LayerCalibrationInput(
                proj, torch.randn(64, 16, generator=g), torch.arange(64)
            )
        )
    return inputs


def test_calibrate_layers_uses_the_cache(tmp_path: Any, monkeypatch: Any) -> None:
    inputs = _synthetic_inputs()
    cache = CalibrationCache(tmp_path)
    first = calibrate_layers(
        inputs, CalibrationOptions(partial_ratio=0.25), cache=cache, progress=False
    )
    assert len(first) == 3
    assert all(s.d_partial == 2 for s in first)
    assert len(list(tmp_path.glob("*.pt"))) == 1

    def boom(*_args: Any) -> LayerSkew:
        raise AssertionError("fit called despite a cached result")

    monkeypatch.setattr(calibration, "fit_layer", boom)
    second = calibrate_layers(
        inputs, CalibrationOptions(partial_ratio=0.25), cache=cache, progress=False
    )
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.layer_skew.skew, b.layer_skew.skew)
        assert torch.equal(a.layer_skew.channels, b.layer_skew.channels)
    with pytest.raises(AssertionError, match="fit called"):  # other options: miss
        calibrate_layers(
            inputs, CalibrationOptions(partial_ratio=0.5), cache=cache, progress=False
        )


def test_calibration_is_deterministic() -> None:
    inputs = _synthetic_inputs()
    a = calibrate_layers(inputs, progress=False)
    b = calibrate_layers(inputs, progress=False)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.layer_skew.skew, y.layer_skew.skew)
        assert torch.equal(x.layer_skew.channels, y.layer_skew.channels)


class _ByteTokenizer:
    """Tokenizer stand-in: one token per UTF-8 byte."""

    def __call__(
        self, text: str, return_tensors: str = "pt"
    ) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.tensor([list(text.encode())], dtype=torch.long)}


def _tiny_model(kind: str) -> Any:
    torch.manual_seed(0)
    common = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    if kind == "qwen2":
        config = transformers.Qwen2Config(**common)
    else:
        config = transformers.Qwen3Config(head_dim=16, **common)
    config._attn_implementation = "eager"
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_hf_capture_reproduces_the_models_attention(kind: str) -> None:
    """Post-RoPE q/k rebuilt from the captured x give the layer's own output."""
    model = _tiny_model(kind)
    ids = torch.randint(0, 256, (40,))
    xs = hf_model.capture_attention_inputs(model, ids)
    projections = hf_model.attention_projections(model)
    assert len(xs) == len(projections) == 3
    if kind == "qwen3":
        assert projections[0].q_norm is not None and projections[0].k_norm is not None

    outputs: list[torch.Tensor] = []
    hooks = [
        layer.self_attn.register_forward_hook(
            lambda _m, _a, out: outputs.append(out[0][0])
        )
        for layer in model.model.layers
    ]
    with torch.no_grad():
        hidden = model.model(
            input_ids=ids[None], output_hidden_states=True
        ).hidden_states
    for h in hooks:
        h.remove()
    positions = torch.arange(40)
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    for i, (x, proj) in enumerate(zip(xs, projections, strict=True)):
        layer = model.model.layers[i]
        with torch.no_grad():
            torch.testing.assert_close(x, layer.input_layernorm(hidden[i][0]))
            q, k = proj.queries(x, positions), proj.keys(x, positions)
            v = layer.self_attn.v_proj(x).view(40, proj.num_kv_heads, proj.head_dim)
            group = proj.num_heads // proj.num_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            logits = torch.einsum("thd,shd->hts", q, k) * proj.head_dim**-0.5
            probs = logits.masked_fill(~causal, float("-inf")).softmax(-1)
            attn = torch.einsum("hts,shd->thd", probs, v).reshape(40, -1)
            torch.testing.assert_close(
                layer.self_attn.o_proj(attn), outputs[i], atol=1e-5, rtol=1e-4
            )


@pytest.mark.parametrize("kind", ["qwen2", "qwen3"])
def test_calibrate_hf_model_with_cache(
    kind: str, tmp_path: Any, monkeypatch: Any
) -> None:
    model = _tiny_model(kind)
    cache = CalibrationCache(tmp_path)
    text = "def f(x):\n    return x * 2\n" * 8
    specs = hf_model.calibrate_hf_model(
        model, _ByteTokenizer(), text=text, cache=cache, progress=False
    )
    assert len(specs) == 3
    assert all(s.d_partial == 5 for s in specs)  # ceil(0.3 * 16)
    assert not specs[0].folded  # RoPE: full query path
    x = torch.randn(2, 64)
    assert specs[1].speculate(x, torch.tensor([3, 9])).shape == (
        2,
        4,
        specs[1].d_partial,
    )

    def boom(*_args: Any) -> Any:
        raise AssertionError("recomputed")

    monkeypatch.setattr(hf_model, "capture_attention_inputs", boom)
    again = hf_model.calibrate_hf_model(
        model, _ByteTokenizer(), text=text, cache=cache, progress=False
    )
    assert torch.equal(again[2].layer_skew.skew, specs[2].layer_skew.skew)
    with pytest.raises(AssertionError, match="recomputed"):
        hf_model.calibrate_hf_model(
            model, _ByteTokenizer(), text=text + "#", cache=cache, progress=False
        )
