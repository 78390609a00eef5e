"""What the platform hook does to vLLM's config when INFINIGEN is selected."""

from __future__ import annotations

import json
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
    # Reading in place on CPU, vLLM's own compilation stays on.
    assert config.model_config.enforce_eager is False
    assert config.compilation_config.mode != 0  # not CompilationMode.NONE
    # No --block-size: the probe's choice for this model's attention shape
    # (cached per process, so the same call returns what the hook used).
    from vllm_infinigen.engine.cost_probe import CPU_BLOCK_SIZES, probe_block_size

    choice = probe_block_size(14, 2, 64, config.model_config.dtype)
    assert config.cache_config.block_size == choice.block_size in CPU_BLOCK_SIZES
    assert config.cache_config.kv_cache_memory_bytes == int(1.5 * (1 << 30))
    assert config.parallel_config.worker_extension_cls.endswith(
        "InfiniGenWorkerExtension"
    )


@pytest.mark.parametrize(
    "options", [{"swap_mode": "sync"}, {"query_source": "speculated"}]
)
def test_options_that_speculate_ahead_run_eagerly(
    qwen_model_dir: Path, options: dict[str, object]
) -> None:
    config = _engine_config(
        qwen_model_dir,
        attention_backend="infinigen",
        additional_config={"infinigen": options},
    )
    assert config.model_config.enforce_eager is True
    assert config.compilation_config.mode == 0  # CompilationMode.NONE


def test_user_enforce_eager_kept(qwen_model_dir: Path) -> None:
    config = _engine_config(
        qwen_model_dir, attention_backend="infinigen", enforce_eager=True
    )
    assert config.compilation_config.mode == 0


def test_measured_block_size_survives_the_engine_cores_second_hook(
    qwen_model_dir: Path,
) -> None:
    from vllm_infinigen.engine.cost_probe import CPU_BLOCK_SIZES

    config = _engine_config(qwen_model_dir, attention_backend="infinigen")
    chosen = config.cache_config.block_size
    # The front-end's choice differs from what a probe in the engine core's
    # process would give: the engine core must keep the front-end's.
    front_end = next(size for size in CPU_BLOCK_SIZES if size != chosen)
    config.cache_config.block_size = front_end
    config.__post_init__()  # as vLLM's engine core does after its handshake
    assert config.cache_config.block_size == front_end


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


#: Configurations of models INFINIGEN refuses (no weights: vLLM builds its
#: configuration from ``config.json`` alone, and the refusal comes first).
UNSUPPORTED_MODELS = {
    "mla": (
        {
            "architectures": ["DeepseekV2ForCausalLM"],
            "model_type": "deepseek_v2",
            "hidden_size": 64,
            "intermediate_size": 128,
            "moe_intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "kv_lora_rank": 32,
            "q_lora_rank": None,
            "qk_rope_head_dim": 16,
            "qk_nope_head_dim": 16,
            "v_head_dim": 16,
            "n_routed_experts": 4,
            "n_shared_experts": 1,
            "num_experts_per_tok": 2,
            "first_k_dense_replace": 1,
            "vocab_size": 1000,
            "max_position_embeddings": 2048,
            "torch_dtype": "float32",
        },
        "DeepseekV2ForCausalLM: multi-head latent attention (MLA) is not supported",
    ),
    "encoder-only": (
        {
            "architectures": ["BertModel"],
            "model_type": "bert",
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 128,
            "vocab_size": 1000,
            "max_position_embeddings": 2048,
            "torch_dtype": "float32",
        },
        "BertModel: --runner pooling is not supported (allowed: generate)",
    ),
}


def unsupported_model(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A folder with the configuration of an unsupported model, and the
    refusal expected for it."""
    config, message = UNSUPPORTED_MODELS[kind]
    folder = tmp_path / kind
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder, message


@pytest.mark.parametrize("kind", sorted(UNSUPPORTED_MODELS))
def test_unsupported_model_refused_at_config(tmp_path: Path, kind: str) -> None:
    folder, message = unsupported_model(tmp_path, kind)
    # vLLM's own backend takes the configuration: the refusal is ours.
    assert _engine_config(folder).model_config.architectures
    with pytest.raises(Exception) as info:
        _engine_config(folder, attention_backend="infinigen")
    assert message in str(info.value)
    assert "vLLM's default attention backend" in str(info.value)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"use_mla": True}, "multi-head latent attention (MLA) is not supported"),
        ({"is_encoder_decoder": True}, "encoder-decoder models are not supported"),
        ({"is_attention_free": True}, "no attention layers"),
        ({"runner_type": "pooling"}, "--runner pooling is not supported"),
    ],
)
def test_model_support_names_what_is_unsupported(
    flags: dict[str, object], message: str
) -> None:
    from vllm_infinigen.config import check_model_support

    with pytest.raises(ValueError, match="cannot serve M: ") as info:
        check_model_support(architecture="M", **flags)  # type: ignore[arg-type]
    assert message in str(info.value)
    check_model_support(architecture="M")  # a decoder-only generator passes
    check_model_support(architecture="M", runner_type="draft")
