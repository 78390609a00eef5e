"""Ray Serve LLM configuration of INFINIGEN, with no Ray cluster.

Everything here runs in this process: the builder's ``LLMConfig``, the
Serve application graph Ray's builder makes from it, the deploy/ files
against Ray's own schemas, and Ray's conversion of the engine arguments into
vLLM's engine configuration. Starting Ray is refused (``no_ray``).
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.support import RAY_SERVE_MARKS, RAYSERVICE, SERVE_CONFIG

pytestmark = RAY_SERVE_MARKS

MODEL = "/models/models/qwen2.5-coder-0.5b"  # a path: need not exist here


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Ray may not start: ``ray.init`` (which Ray also calls on its own when
    something needs a connection) raises. Ray Serve LLM's builder reads the
    connected worker's ``runtime_env``; it gets an empty one."""
    import ray

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("this test must not start or join a Ray cluster")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(
        ray, "get_runtime_context", lambda: types.SimpleNamespace(runtime_env={})
    )
    yield
    assert not ray.is_initialized()


def _deployments(app: Any) -> tuple[Any, Any]:
    """The ingress and the (only) LLMServer deployment of a built app."""
    ingress = app._bound_deployment
    (server_app,) = ingress.init_kwargs["llm_deployments"].values()
    return ingress, server_app._bound_deployment


def _serve_app_args(text: str) -> dict[str, Any]:
    """Validate a Serve config with Ray's schema; its one application's args."""
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
    (app,) = schema.applications
    assert app.import_path == "vllm_infinigen.ray_serve:build_app"
    assert app.route_prefix == "/"
    return dict(app.args)


def test_llm_config_selects_infinigen_on_cpu(no_ray: None) -> None:
    from ray.llm._internal.serve.core.server.llm_server import LLMServer

    from vllm_infinigen.ray_serve import (
        HEALTH_CHECK_PERIOD_S,
        HEALTH_CHECK_TIMEOUT_S,
        infinigen_llm_config,
    )

    cfg = infinigen_llm_config(
        MODEL, infinigen={"budget": 0.3, "swap-mode": "thread"}, accelerator="cpu"
    )
    assert cfg.model_id == "qwen2.5-coder-0.5b"
    assert cfg.engine_kwargs["attention_backend"] == "infinigen"
    assert cfg.engine_kwargs["additional_config"] == {
        "infinigen": {"budget": 0.3, "swap_mode": "thread"}
    }
    assert cfg.accelerator_config is not None
    assert cfg.accelerator_config.kind == "cpu"
    assert cfg.accelerator_type is None
    assert cfg.runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert cfg.deployment_config["health_check_timeout_s"] == HEALTH_CHECK_TIMEOUT_S
    assert cfg.deployment_config["health_check_period_s"] == HEALTH_CHECK_PERIOD_S
    assert cfg.get_engine_config().placement_bundles == [{"CPU": 1}]
    # Ray's own deployment options: one CPU bundle, no GPU anywhere.
    options = LLMServer.get_deployment_options(cfg)
    assert options["placement_group_bundles"] == [{"CPU": 1, "GPU": 0}]


def test_auto_accelerator_follows_cuda(
    no_ray: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm_infinigen import ray_serve

    monkeypatch.setattr(ray_serve, "_cuda_visible", lambda: False)
    cpu = ray_serve.infinigen_llm_config(MODEL, num_cpus=4)
    assert cpu.accelerator_config.kind == "cpu"
    assert cpu.placement_group_config == {"bundles": [{"CPU": 4}]}

    monkeypatch.setattr(ray_serve, "_cuda_visible", lambda: True)
    gpu = ray_serve.infinigen_llm_config(MODEL, num_cpus=4)
    assert gpu.accelerator_config.kind == "gpu"  # Ray's default
    assert gpu.placement_group_config is None
    assert gpu.deployment_config["ray_actor_options"] == {"num_cpus": 4}


def test_runtime_env_merges_over_defaults(no_ray: None) -> None:
    from vllm_infinigen.ray_serve import infinigen_llm_config

    cfg = infinigen_llm_config(
        MODEL,
        accelerator="cpu",
        runtime_env={"env_vars": {"HF_HUB_OFFLINE": "0", "OMP_NUM_THREADS": 4}},
    )
    assert cfg.runtime_env["env_vars"] == {
        "HF_HUB_OFFLINE": "0",
        "OMP_NUM_THREADS": "4",
    }
    hub = infinigen_llm_config("Qwen/Qwen2.5-Coder-0.5B-Instruct", accelerator="cpu")
    assert "HF_HUB_OFFLINE" not in hub.runtime_env["env_vars"]
    assert hub.model_id == "Qwen/Qwen2.5-Coder-0.5B-Instruct"


@pytest.mark.parametrize(
    ("infinigen", "names"),
    [
        ('{"budget": 1.5}', ["'budget'", "(0.0, 1.0]", "1.5"]),
        ({"bugdet": 0.3}, ["'bugdet'", "known options", "budget"]),
        ({"swap_mode": "async"}, ["'swap_mode'", "in_place", "'async'"]),
    ],
)
def test_build_app_refuses_bad_option(
    no_ray: None, infinigen: Any, names: list[str]
) -> None:
    from vllm_infinigen.ray_serve import build_app

    with pytest.raises(ValueError) as error:
        build_app({"model_source": MODEL, "infinigen": infinigen})
    for name in names:
        assert name in str(error.value)


def test_pipeline_parallel_refused(no_ray: None) -> None:
    from vllm_infinigen.ray_serve import build_app

    with pytest.raises(ValueError, match="pipeline_parallel_size.*allowed: 1"):
        build_app(
            {"model_source": MODEL, "engine_kwargs": {"pipeline_parallel_size": 2}}
        )


@pytest.mark.parametrize("size", [0, -1, 1.5, "2"])
def test_bad_tensor_parallel_size_refused(no_ray: None, size: object) -> None:
    from vllm_infinigen.ray_serve import infinigen_llm_config

    with pytest.raises(ValueError, match="tensor_parallel_size.*integer >= 1"):
        infinigen_llm_config(MODEL, engine_kwargs={"tensor_parallel_size": size})


def test_tensor_parallel_passed_to_the_engine(no_ray: None) -> None:
    from vllm_infinigen.ray_serve import infinigen_llm_config

    config = infinigen_llm_config(
        MODEL, engine_kwargs={"tensor_parallel_size": 2}, accelerator="cpu"
    )
    assert config.engine_kwargs["tensor_parallel_size"] == 2
    assert config.engine_kwargs["attention_backend"] == "infinigen"


@pytest.mark.parametrize("key", ["attention_backend", "additional_config"])
def test_own_engine_kwargs_refused(no_ray: None, key: str) -> None:
    from vllm_infinigen.ray_serve import infinigen_llm_config

    with pytest.raises(ValueError, match=key):
        infinigen_llm_config(MODEL, engine_kwargs={key: "flash_attn"})


def test_cli_string_args(no_ray: None) -> None:
    """Arguments as ``serve run ... key=value`` hands them over (Ray's own
    parser): strings, JSON where a structure or number is meant."""
    from ray.serve.scripts import convert_args_to_dict

    from vllm_infinigen.ray_serve import serving_args

    args = convert_args_to_dict(
        (
            f"model_source={MODEL}",
            "model_id=qwen",
            'infinigen={"budget": 0.3, "dense_layers": [0, 1]}',
            'engine_kwargs={"max_model_len": 4096, "dtype": "float32"}',
            'autoscaling={"min_replicas": 1, "max_replicas": 3}',
            "num_cpus=2",
            "health_check_timeout_s=120",
            "ingress_num_cpus=0.5",
        )
    )
    spec = serving_args(args)
    (cfg,) = spec["llm_configs"]
    assert cfg.model_id == "qwen"
    assert cfg.engine_kwargs["additional_config"] == {
        "infinigen": {"budget": 0.3, "dense_layers": [0, 1]}
    }
    assert cfg.engine_kwargs["max_model_len"] == 4096
    assert cfg.deployment_config["autoscaling_config"]["max_replicas"] == 3
    assert "num_replicas" not in cfg.deployment_config
    assert cfg.deployment_config["health_check_timeout_s"] == 120
    assert spec["ingress_deployment_config"] == {"ray_actor_options": {"num_cpus": 0.5}}

    with pytest.raises(ValueError, match="'infinigen' must be JSON"):
        serving_args({"model_source": MODEL, "infinigen": "budget=0.3"})
    with pytest.raises(ValueError, match="unknown argument 'replicas'"):
        serving_args({"model_source": MODEL, "replicas": "2"})
    with pytest.raises(ValueError, match="'model_source'"):
        serving_args({"model_id": "qwen"})
    with pytest.raises(ValueError, match="num_replicas"):
        serving_args({"model_source": MODEL, "num_replicas": "0"})


def test_build_app_graph_cpu_only(no_ray: None) -> None:
    """Ray's builder, as ``serve run`` calls it: the ingress reserves no CPU
    and the model replica is one CPU bundle with no GPU."""
    from ray.serve import Application

    from vllm_infinigen.ray_serve import build_app

    app = build_app({"model_source": MODEL, "accelerator": "cpu", "num_cpus": "3"})
    assert isinstance(app, Application)
    ingress, server = _deployments(app)
    assert ingress.ray_actor_options["num_cpus"] == 0
    assert server._replica_config.placement_group_bundles == [{"CPU": 3, "GPU": 0}]
    assert server.ray_actor_options["num_cpus"] == 0
    config = server.init_kwargs["llm_config"]
    assert config.engine_kwargs["attention_backend"] == "infinigen"


def test_serve_config_file(no_ray: None) -> None:
    from ray.serve.llm import LLMServingArgs

    from vllm_infinigen.ray_serve import serving_args

    args = _serve_app_args(SERVE_CONFIG.read_text())
    spec = LLMServingArgs.model_validate(serving_args(args))
    (cfg,) = spec.llm_configs
    assert cfg.engine_kwargs["attention_backend"] == "infinigen"
    assert cfg.engine_kwargs["additional_config"] == {"infinigen": {"budget": 0.2}}
    assert cfg.accelerator_config.kind == "cpu"
    assert spec.ingress_deployment_config["ray_actor_options"]["num_cpus"] == 0


def _cpus(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_rayservice_manifest(no_ray: None) -> None:
    manifest = yaml.safe_load(RAYSERVICE.read_text())
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["kind"] == "RayService"
    # The same application as deploy/ray/serve_config.yaml.
    args = _serve_app_args(manifest["spec"]["serveConfigV2"])
    assert args == _serve_app_args(SERVE_CONFIG.read_text())

    cluster = manifest["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0"
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no model work
    (group,) = cluster["workerGroupSpecs"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    (container,) = group["template"]["spec"]["containers"]
    resources = container["resources"]
    assert resources["requests"] == resources["limits"]  # Guaranteed pod
    # One replica's bundle fits a worker pod; the ingress fits the 0-CPU head.
    assert args["num_cpus"] <= _cpus(resources["limits"]["cpu"])
    assert args["autoscaling"]["max_replicas"] <= group["maxReplicas"]


def test_engine_config_selects_infinigen(no_ray: None) -> None:
    """Ray's conversion of the config file's engine arguments into vLLM's
    engine configuration (no engine starts), on the locally built model."""
    from vllm_infinigen.models import is_built, model_path

    if not is_built("qwen2.5-coder-0.5b"):
        pytest.skip("qwen2.5-coder-0.5b not built (python -m vllm_infinigen.models)")
    from ray.llm._internal.serve.engines.vllm.vllm_engine import (
        _get_vllm_engine_config,
    )
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from vllm_infinigen.ray_serve import serving_args

    args = _serve_app_args(SERVE_CONFIG.read_text())
    args["model_source"] = str(model_path("qwen2.5-coder-0.5b"))
    (cfg,) = serving_args(args)["llm_configs"]
    _, vllm_config = _get_vllm_engine_config(cfg)
    assert vllm_config.attention_config.backend == AttentionBackendEnum.INFINIGEN
    assert vllm_config.additional_config == {"infinigen": {"budget": 0.2}}
    assert vllm_config.parallel_config.distributed_executor_backend == "mp"
    assert vllm_config.parallel_config.world_size == 1
    assert Path(vllm_config.model_config.model) == model_path("qwen2.5-coder-0.5b")
