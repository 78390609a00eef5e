"""InfiniGenConfig: every option accepts good values and names itself on bad."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from vllm_infinigen.config import InfiniGenConfig

GOOD: list[tuple[str, Any]] = [
    ("budget", 1.0),
    ("budget", 0.05),
    ("max_blocks", 8),
    ("max_blocks", None),
    ("alpha", 4),
    ("alpha", 0.5),
    ("partial_ratio", 0.3),
    ("partial_ratio", 1.0),
    ("sink_blocks", 0),
    ("sink_blocks", 2),
    ("recent_blocks", 1),
    ("recent_blocks", 3),
    ("min_blocks", 0),
    ("min_blocks", 16),
    ("sparse_min_tokens", 0),
    ("sparse_min_tokens", 16384),
    ("dense_layers", [0, 23]),
    ("dense_layers", []),
    ("host_pool_gib", 8),
    ("host_pool_gib", None),
    ("policy", "infinigen"),
    ("policy", "quest"),
    ("policy", "h2o"),
    ("policy", "streaming"),
    ("policy", "dense"),
    ("calibration_file", "/tmp/calib.txt"),
    ("swap_mode", "thread"),
    ("swap_mode", "sync"),
    ("swap_mode", "in_place"),
    ("score_rule", "max"),
    ("score_rule", "auto"),
    ("partial_ratio", None),
    ("head_reduction", "per_head"),
    ("head_reduction", "max"),
    ("query_source", "real"),
    ("partial_dtype", "bfloat16"),
    ("partial_dtype", "float16"),
    ("partial_dtype", "int4"),
    ("residual_means", False),
    ("partial_channels", "query_key"),
    ("partial_channels", "query"),
    ("recall_sample_rate", 0.0),
    ("recall_sample_rate", 1.0),
    ("http_reconfigure", True),
]

BAD: list[tuple[str, Any]] = [
    ("budget", 0),
    ("budget", 1.5),
    ("budget", -0.1),
    ("budget", "half"),
    ("budget", float("nan")),
    ("max_blocks", 0),
    ("max_blocks", 2.5),
    ("alpha", 0),
    ("alpha", -1),
    ("alpha", float("inf")),
    ("alpha", True),
    ("partial_ratio", 0),
    ("partial_ratio", 1.01),
    ("sink_blocks", -1),
    ("sink_blocks", 1.0),
    ("recent_blocks", 0),
    ("min_blocks", -1),
    ("min_blocks", 2.5),
    ("sparse_min_tokens", -1),
    ("sparse_min_tokens", 1.5),
    ("dense_layers", [-1]),
    ("dense_layers", "0"),
    ("dense_layers", [0.5]),
    ("host_pool_gib", 0),
    ("host_pool_gib", -2),
    ("policy", "h2o-please"),
    ("calibration_file", ""),
    ("swap_mode", "async"),
    ("score_rule", "mass"),
    ("head_reduction", 1),
    ("query_source", "actual"),
    ("partial_dtype", "int8"),
    ("partial_dtype", "uint8"),  # int4's storage type is not an option
    ("residual_means", "no"),
    ("partial_channels", "key"),
    ("recall_sample_rate", 1.5),
    ("recall_sample_rate", -0.01),
    ("http_reconfigure", "on"),
]


@pytest.mark.parametrize(("name", "value"), GOOD)
def test_good_value_accepted(name: str, value: Any) -> None:
    config = InfiniGenConfig.from_dict({name: value})
    expected = tuple(value) if isinstance(value, list) else value
    assert getattr(config, name) == expected


@pytest.mark.parametrize(("name", "value"), BAD)
def test_bad_value_names_option(name: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"'{name}'"):
        InfiniGenConfig.from_dict({name: value})


def test_every_option_is_covered_by_good_and_bad_cases() -> None:
    names = set(InfiniGenConfig.option_names())
    assert {n for n, _ in GOOD} == names
    assert {n for n, _ in BAD} == names


def test_unknown_key_lists_known_options() -> None:
    with pytest.raises(ValueError) as info:
        InfiniGenConfig.from_dict({"budgte": 0.2})
    message = str(info.value)
    assert "budgte" in message
    for name in InfiniGenConfig.option_names():
        assert name in message


def test_dashes_accepted_and_defaults_kept() -> None:
    config = InfiniGenConfig.from_dict({"partial-ratio": 0.25})
    assert config.partial_ratio == 0.25
    assert config.budget == InfiniGenConfig().budget


def test_from_additional_config() -> None:
    assert InfiniGenConfig.from_additional_config({}) == InfiniGenConfig()
    assert InfiniGenConfig.from_additional_config(None) == InfiniGenConfig()
    config = InfiniGenConfig.from_additional_config(
        {"other_plugin": 1, "infinigen": {"alpha": 3}}
    )
    assert config.alpha == 3
    with pytest.raises(ValueError, match="JSON object"):
        InfiniGenConfig.from_additional_config({"infinigen": [1, 2]})


def test_frozen_and_exactness() -> None:
    config = InfiniGenConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.budget = 1.0  # type: ignore[misc]
    assert InfiniGenConfig(budget=1.0).is_exact
    assert not InfiniGenConfig(budget=1.0, max_blocks=4).is_exact
    assert not InfiniGenConfig(budget=0.5).is_exact


def test_partial_ratio_and_score_rule_chosen_per_model() -> None:
    """Unset, whole keys at 16 bits for few sparse layers (Gemma 3 270M: 3
    of 18) and at 4 bits otherwise (Qwen2.5-Coder-0.5B: 23 of 24), or 30% of
    the channels where a float type is asked for; ``auto`` scores whole keys
    at 16/32 bits by their peak, anything else by mass."""
    config = InfiniGenConfig()
    assert config.partial_ratio is None and config.score_rule == "auto"
    hybrid, full = config.for_model(3, 18), config.for_model(23, 24)
    assert hybrid.partial_ratio == 1.0 and hybrid.partial_dtype == "auto"
    assert hybrid.block_score_rule == "max"
    assert full.partial_ratio == 1.0 and full.partial_dtype == "int4"
    assert full.block_score_rule == "log_mass"
    assert config.for_model(6, 24).partial_dtype == "auto"  # a quarter: 16 bits
    assert config.for_model(7, 24).partial_dtype == "int4"
    floats = InfiniGenConfig(partial_dtype="bfloat16").for_model(23, 24)
    assert floats.partial_ratio == 0.3 and floats.partial_dtype == "bfloat16"
    set_ratio = InfiniGenConfig(partial_ratio=0.3).for_model(23, 24)
    assert set_ratio.partial_ratio == 0.3 and set_ratio.partial_dtype == "auto"
    assert InfiniGenConfig(partial_ratio=0.5).for_model(3, 18).partial_ratio == 0.5
    four_bit = InfiniGenConfig(partial_dtype="int4").for_model(3, 18)
    assert four_bit.partial_ratio == 1.0 and four_bit.block_score_rule == "log_mass"
    chosen = InfiniGenConfig(score_rule="log_mass").for_model(3, 18)
    assert chosen.block_score_rule == "log_mass"
    assert full.changed({"score_rule": "max"}).block_score_rule == "max"
    with pytest.raises(ValueError, match="'partial_ratio' is fixed at start-up"):
        hybrid.changed({"partial_ratio": 0.3})


def test_check_model_layer_range() -> None:
    InfiniGenConfig(dense_layers=(0, 23)).check_model(24)
    with pytest.raises(ValueError, match=r"'dense_layers'.*0\.\.23"):
        InfiniGenConfig(dense_layers=(0, 24)).check_model(24)


def test_describe_lists_every_option() -> None:
    line = InfiniGenConfig().describe()
    for name in InfiniGenConfig.option_names():
        assert f"{name}=" in line
