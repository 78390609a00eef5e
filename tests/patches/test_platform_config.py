"""What the platform hook does to vLLM's config when INFINIGEN is selected."""

from __future__ import annotations

from pathlib import Path

import pytest


def _engine_config(model: Path, **kwargs: object):  # type: ignore[no-untyped-def]
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(model), max_model_len=1024, **kwargs)  # type: ignore[arg-type]
    return args.create_engine_config()


def test_infinigen_config_effects(qwen_model_dir: Path) -> None:
    config = _engine_config(
        qwen_model_dir,
        attention_backend="infinigen",
        additional_config={"infinigen": {"host_pool_gib": 1.5, "budget": 0.25}},
    )
    assert config.attention_config.backend.name == "INFINIGEN"
    assert config.model_config.enforce_eager is True
    assert config.compilation_config.mode == 0  # CompilationMode.NONE
    assert config.cache_config.block_size == 32
    assert config.cache_config.kv_cache_memory_bytes == int(1.5 * (1 << 30))
    assert config.parallel_config.worker_extension_cls.endswith(
        "InfiniGenWorkerExtension"
    )


def test_user_block_size_kept(qwen_model_dir: Path) -> None:
    config = _engine_config(
        qwen_model_dir, attention_backend="infinigen", block_size=64
    )
    assert config.cache_config.block_size == 64


def test_other_backends_untouched(qwen_model_dir: Path) -> None:
    config = _engine_config(qwen_model_dir)
    assert config.cache_config.block_size == 128
    assert not config.parallel_config.worker_extension_cls


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dense_layers": [0, 24]}, "'dense_layers'"),
        ({"alpha": -1}, "'alpha' must be a number in (0.0, inf)"),
        ({"polcy": "infinigen"}, "known options"),
    ],
)
def test_bad_options_stop_config(
    qwen_model_dir: Path, options: dict[str, object], message: str
) -> None:
    with pytest.raises(Exception) as info:
        _engine_config(
            qwen_model_dir,
            attention_backend="infinigen",
            additional_config={"infinigen": options},
        )
    assert message in str(info.value)


def test_pipeline_parallel_refused_at_config(qwen_model_dir: Path) -> None:
    with pytest.raises(Exception) as info:
        _engine_config(
            qwen_model_dir, attention_backend="infinigen", pipeline_parallel_size=2
        )
    assert "pipeline_parallel_size=2; allowed: 1" in str(info.value)


def test_tensor_parallel_accepted_at_config(qwen_model_dir: Path) -> None:
    config = _engine_config(
        qwen_model_dir, attention_backend="infinigen", tensor_parallel_size=2
    )
    assert config.parallel_config.tensor_parallel_size == 2
    assert config.attention_config.backend.name == "INFINIGEN"
