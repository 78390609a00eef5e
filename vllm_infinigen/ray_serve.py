"""Serve the INFINIGEN backend through Ray Serve LLM (``ray.serve.llm``).

Each Serve replica runs one single-worker vLLM engine with the INFINIGEN
attention backend; Ray places, scales and routes between replicas. Three
entry points:

* :func:`infinigen_llm_config`: one ``ray.serve.llm.LLMConfig`` with our
  options validated on the caller's side;
* :func:`build_app`: a Serve application builder, for ``serve run
  vllm_infinigen.ray_serve:build_app model_source=/path ...`` and for the
  ``import_path`` of a Serve config file (``deploy/ray/serve_config.yaml``);
* ``python -m vllm_infinigen.ray_serve``: a local Ray cluster serving the
  OpenAI API on a chosen host and port until Ctrl-C (``make serve-ray``).

Ray is imported inside the functions, so the package imports without it
(install the ``ray`` extra to use this module). Deployment recipes and what
was run where: ``deploy/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from vllm_infinigen.config import (
    ADDITIONAL_CONFIG_KEY,
    InfiniGenConfig,
    check_parallel_layout,
)

#: Serve application name used by :func:`main`.
APP_NAME = "infinigen"

#: Seconds Serve waits for a replica's health check, and between checks.
#: Ray's defaults (10 s each, ``ray.llm``'s ``constants.py``) are tight for a
#: replica process sharing a few CPU cores with its engine's OpenMP threads:
#: a late answer makes Serve kill a working replica and start vLLM again.
#: A margin chosen, not measured. Start-up itself is not bounded by these
#: (Serve only warns about slow replicas).
HEALTH_CHECK_TIMEOUT_S = 300.0
HEALTH_CHECK_PERIOD_S = 30.0

#: Engine arguments this module sets itself; a caller's value is refused.
OWN_ENGINE_KWARGS: tuple[str, ...] = ("attention_backend", "additional_config")

#: ``accelerator`` values: ``auto`` (CPU when torch sees no CUDA device in the
#: process that builds the config, else Ray's own choice), ``cpu``, ``gpu``.
ACCELERATORS: tuple[str, ...] = ("auto", "cpu", "gpu")

#: Application arguments of :func:`build_app` and how a command-line string
#: is read: ``str`` kept as is, ``json`` parsed as JSON (numbers, objects).
APP_ARGS: dict[str, str] = {
    "model_source": "str",
    "model_id": "str",
    "accelerator": "str",
    "infinigen": "json",
    "engine_kwargs": "json",
    "num_replicas": "json",
    "autoscaling": "json",
    "num_cpus": "json",
    "runtime_env": "json",
    "health_check_timeout_s": "json",
    "health_check_period_s": "json",
    "max_ongoing_requests": "json",
    "ingress_num_cpus": "json",
}


def _cuda_visible() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def _is_local_folder(model_source: str) -> bool:
    """A path rather than a hub id: absolute, ``./``-style, or an existing
    folder here (the folder may exist only on the Ray workers)."""
    return (
        os.path.isabs(model_source)
        or model_source.startswith(("./", "../", "~"))
        or Path(model_source).is_dir()
    )


def _check_count(name: str, value: object, minimum: float) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be a number >= {minimum}, got {value!r}")


def _engine_kwargs(
    engine_kwargs: Mapping[str, Any] | None, infinigen: dict[str, Any]
) -> dict[str, Any]:
    kwargs = dict(engine_kwargs or {})
    clash = [key for key in OWN_ENGINE_KWARGS if key in kwargs]
    if clash:
        raise ValueError(
            f"engine_kwargs {clash[0]!r} is set by infinigen_llm_config "
            "(attention_backend='infinigen', additional_config carrying the "
            "'infinigen' options); pass INFINIGEN options as `infinigen` instead"
        )
    for key in ("tensor_parallel_size", "pipeline_parallel_size"):
        size = kwargs.get(key, 1)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(
                f"engine_kwargs {key!r} must be an integer >= 1, got {size!r}"
            )
    # The engine's own refusal (config.py), here before any replica starts.
    check_parallel_layout(kwargs.get("pipeline_parallel_size", 1))
    kwargs["attention_backend"] = "infinigen"
    kwargs["additional_config"] = {ADDITIONAL_CONFIG_KEY: infinigen}
    return kwargs


def _given_options(
    given: Mapping[str, Any] | None, options: InfiniGenConfig
) -> dict[str, Any]:
    """The options the caller gave (names with underscores), with their
    validated values, JSON-ready; the engine validates them again from
    ``additional_config``. Defaults stay out: the engine applies its own."""
    validated = options.to_dict()
    chosen = {str(key).replace("-", "_") for key in (given or {})}
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in validated.items()
        if key in chosen
    }


def infinigen_llm_config(
    model_source: str,
    *,
    model_id: str | None = None,
    infinigen: Mapping[str, Any] | None = None,
    engine_kwargs: Mapping[str, Any] | None = None,
    num_replicas: int = 1,
    autoscaling: Mapping[str, Any] | None = None,
    num_cpus: float = 1,
    runtime_env: Mapping[str, Any] | None = None,
    health_check_timeout_s: float = HEALTH_CHECK_TIMEOUT_S,
    health_check_period_s: float = HEALTH_CHECK_PERIOD_S,
    max_ongoing_requests: int | None = None,
    accelerator: str = "auto",
) -> Any:
    """A ``ray.serve.llm.LLMConfig`` serving ``model_source`` with INFINIGEN.

    Everything that can be checked without a replica is checked here, on the
    caller's side, and raises ``ValueError`` naming the argument: Serve
    would otherwise start vLLM once per retry (3 per replica) before
    reporting the same error.

    Args:
        model_source: Hugging Face folder (a path on the Ray workers) or hub id.
        model_id: Name clients use as ``model`` in the OpenAI API; default:
            the folder's name (or the hub id).
        infinigen: INFINIGEN options, as in ``--additional-config
            '{"infinigen": {...}}'`` (``README.md``, "Options"); validated with
            :class:`~vllm_infinigen.config.InfiniGenConfig`.
        engine_kwargs: More vLLM engine arguments (``max_model_len``,
            ``dtype``, ...). ``attention_backend`` and ``additional_config``
            are set here and refused; ``pipeline_parallel_size`` above 1 is
            refused. ``tensor_parallel_size`` runs each replica's engine on
            that many workers (on CPU Ray Serve LLM starts them with vLLM's
            multiprocessing executor inside the replica's node; on GPUs
            Ray places them, one GPU bundle each).
        num_replicas: Fixed number of replicas (ignored with ``autoscaling``).
        autoscaling: Serve ``autoscaling_config`` (``min_replicas``,
            ``max_replicas``, ``target_ongoing_requests``, ...).
        num_cpus: Logical CPUs one replica reserves, its Serve actor and its
            engine together in one placement bundle. On CPU size it to the
            cores the engine should own (on Kubernetes, the pod's CPU limit
            for one replica per pod: vLLM binds its OpenMP threads to every
            core the process may use). On a GPU it is the replica actor's
            share beside Ray's GPU bundle.
        runtime_env: Ray ``runtime_env`` of the replica and its engine;
            ``env_vars`` are merged over the defaults (``HF_HUB_OFFLINE=1``
            when ``model_source`` is a local folder).
        health_check_timeout_s: Seconds Serve waits for a health check.
        health_check_period_s: Seconds between health checks.
        max_ongoing_requests: Serve's per-replica limit of requests in flight;
            default: Ray Serve LLM's.
        accelerator: ``auto`` (a CPU configuration when torch sees no CUDA
            device in this process, else Ray's default GPU placement), ``cpu``
            or ``gpu``. Set it explicitly where the config is built on a
            machine unlike the workers (a CPU-only Ray head of a GPU cluster).
    """
    from ray.serve.llm import LLMConfig

    if not isinstance(model_source, str) or not model_source:
        raise ValueError(
            f"model_source must be a model folder or hub id, got {model_source!r}"
        )
    if accelerator not in ACCELERATORS:
        raise ValueError(
            f"accelerator must be one of {list(ACCELERATORS)}, got {accelerator!r}"
        )
    _check_count("num_replicas", num_replicas, 1)
    _check_count("num_cpus", num_cpus, 0)
    _check_count("health_check_timeout_s", health_check_timeout_s, 1)
    _check_count("health_check_period_s", health_check_period_s, 1)
    if max_ongoing_requests is not None:
        _check_count("max_ongoing_requests", max_ongoing_requests, 1)
    if autoscaling is not None and not isinstance(autoscaling, Mapping):
        raise ValueError(f"autoscaling must be a mapping, got {autoscaling!r}")
    if runtime_env is not None and not isinstance(runtime_env, Mapping):
        raise ValueError(f"runtime_env must be a mapping, got {runtime_env!r}")
    if engine_kwargs is not None and not isinstance(engine_kwargs, Mapping):
        raise ValueError(f"engine_kwargs must be a mapping, got {engine_kwargs!r}")

    options = InfiniGenConfig.from_dict(infinigen)  # ValueError names the option
    kwargs = _engine_kwargs(engine_kwargs, _given_options(infinigen, options))

    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not _cuda_visible())
    deployment: dict[str, Any] = {
        "health_check_timeout_s": health_check_timeout_s,
        "health_check_period_s": health_check_period_s,
    }
    if autoscaling is not None:
        deployment["autoscaling_config"] = dict(autoscaling)
    else:
        deployment["num_replicas"] = num_replicas
    if max_ongoing_requests is not None:
        deployment["max_ongoing_requests"] = max_ongoing_requests

    extra: dict[str, Any] = {}
    if on_cpu:
        # The actor itself reserves nothing: its CPUs are the engine bundle's,
        # so one replica holds exactly ``num_cpus``.
        deployment["ray_actor_options"] = {"num_cpus": 0}
        extra["accelerator_config"] = {"kind": "cpu"}
        extra["placement_group_config"] = {"bundles": [{"CPU": num_cpus}]}
    else:
        deployment["ray_actor_options"] = {"num_cpus": num_cpus}

    env = dict(runtime_env or {})
    env_vars: dict[str, str] = {}
    if _is_local_folder(model_source):
        env_vars["HF_HUB_OFFLINE"] = "1"
    env_vars.update({k: str(v) for k, v in dict(env.get("env_vars") or {}).items()})
    env["env_vars"] = env_vars

    if model_id is None:
        model_id = (
            Path(model_source).name if _is_local_folder(model_source) else model_source
        )
    return LLMConfig(
        model_loading_config={"model_id": model_id, "model_source": model_source},
        engine_kwargs=kwargs,
        deployment_config=deployment,
        runtime_env=env,
        **extra,
    )


def parse_app_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`build_app`'s arguments, typed.

    ``serve run vllm_infinigen.ray_serve:build_app key=value ...`` passes
    every value as a string; a Serve config file passes YAML values. One
    scheme for both: ``model_source``, ``model_id`` and ``accelerator`` are
    plain strings; every other argument, given as a string, is JSON
    (``num_replicas=2``, ``infinigen='{"budget": 0.3}'``,
    ``engine_kwargs='{"max_model_len": 4096}'``); non-string values are taken
    as they are. Unknown names are refused with the known list.
    """
    if not isinstance(args, Mapping):
        raise ValueError(f"application args must be a mapping, got {args!r}")
    typed: dict[str, Any] = {}
    for key, value in args.items():
        kind = APP_ARGS.get(key)
        if kind is None:
            raise ValueError(f"unknown argument {key!r}; known: {', '.join(APP_ARGS)}")
        if kind == "json" and isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"argument {key!r} must be JSON (e.g. {key}='{{...}}' or a "
                    f"number), got {value!r}: {error}"
                ) from None
        typed[key] = value
    if "model_source" not in typed:
        raise ValueError("argument 'model_source' (model folder or hub id) is required")
    return typed


def serving_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """The ``ray.serve.llm.LLMServingArgs`` dict :func:`build_app` builds
    from: one INFINIGEN ``LLMConfig`` and an ingress reserving
    ``ingress_num_cpus`` (default 0: the OpenAI router is light, and a
    KubeRay head started with ``num-cpus: 0`` can then hold it). Validates
    everything and needs no Ray cluster."""
    typed = parse_app_args(args)
    ingress_cpus = typed.pop("ingress_num_cpus", 0)
    _check_count("ingress_num_cpus", ingress_cpus, 0)
    llm_config = infinigen_llm_config(**typed)
    return {
        "llm_configs": [llm_config],
        "ingress_deployment_config": {"ray_actor_options": {"num_cpus": ingress_cpus}},
    }


def build_app(args: dict[str, Any]) -> Any:
    """Serve application builder: the OpenAI API over one INFINIGEN model.

    ``args`` as in :func:`parse_app_args` (names: :data:`APP_ARGS`; the
    meanings are :func:`infinigen_llm_config`'s, plus ``ingress_num_cpus``).
    A bad argument or INFINIGEN option raises ``ValueError`` before Ray is
    touched. Ray Serve LLM's builder then reads the connected Ray worker's
    ``runtime_env``: with no Ray connected, Ray starts or joins a cluster on
    its own (``RAY_ADDRESS``, else a ``ray start`` cluster on this machine,
    else a new local one); ``serve run --address`` comes too late for that,
    so set ``RAY_ADDRESS`` for a remote cluster.
    """
    from ray.serve.llm import build_openai_app

    return build_openai_app(serving_args(args))


def descendant_pids() -> list[int]:
    """Process ids of this process's descendants (to end leftovers by pid)."""
    import psutil

    return [child.pid for child in psutil.Process().children(recursive=True)]


def end_processes(pids: Iterable[int], grace_s: float = 10.0) -> list[int]:
    """Terminate, then kill after ``grace_s``, the listed processes still
    alive; returns the pids that were still alive. vLLM's engine-core
    process can outlive its Serve replica (Ray Serve LLM's shutdown stops
    only the replica's side of the engine)."""
    import psutil

    alive = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            process.terminate()
            alive.append(process)
        except psutil.NoSuchProcess:
            continue
    _, still = psutil.wait_procs(alive, timeout=grace_s)
    for process in still:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            continue
    return [process.pid for process in alive]


def _stop_on_signals() -> None:
    """SIGINT and SIGTERM both end :func:`main`'s wait through its cleanup:
    SIGTERM is how ``docker stop``, Kubernetes and systemd stop a server, and
    a shell starts background jobs with SIGINT ignored, so Python's own
    Ctrl-C handler would not be there."""

    def stop(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def main(argv: Sequence[str] | None = None) -> None:
    """Start a local Ray cluster, serve one INFINIGEN model on HOST:PORT
    through Ray Serve, block until Ctrl-C, then shut everything down."""
    parser = argparse.ArgumentParser(
        prog="python -m vllm_infinigen.ray_serve",
        description="Serve one model with INFINIGEN through Ray Serve LLM "
        "(OpenAI API) on a local Ray cluster.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--address",
        default="local",
        help="Ray address: 'local' starts a new cluster (default), 'auto' "
        "joins the `ray start` cluster of this machine, or host:port",
    )
    parser.add_argument(
        "--num-cpus",
        type=int,
        default=None,
        help="logical CPUs of a new local cluster (default: the cores here)",
    )
    parser.add_argument(
        "args", nargs="+", metavar="key=value", help="build_app arguments"
    )
    ns = parser.parse_args(argv)
    app_args: dict[str, str] = {}
    for item in ns.args:
        key, sep, value = item.partition("=")
        if not sep or not value:
            parser.error(f"argument {item!r} is not key=value")
        app_args[key] = value
    app_spec = serving_args(app_args)  # fail before starting Ray

    import ray
    from ray import serve
    from ray.serve.llm import build_openai_app

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    local = ns.address == "local"
    init: dict[str, Any] = {"address": ns.address}
    if local:
        init |= {"num_cpus": ns.num_cpus, "include_dashboard": False}
    ray.init(**init)
    _stop_on_signals()  # after ray.init, which installs its own SIGTERM handler
    try:
        serve.start(http_options={"host": ns.host, "port": ns.port})
        serve.run(build_openai_app(app_spec), name=APP_NAME, route_prefix="/")
        print(f"serving the OpenAI API on http://{ns.host}:{ns.port}/v1 (Ctrl-C stops)")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt as stop:
        print(f"{stop or 'SIGINT'}: shutting down", flush=True)
    finally:
        if local:
            leftovers = descendant_pids()
            serve.shutdown()
            ray.shutdown()
            end_processes(leftovers)
        else:  # a shared cluster: remove only our application
            serve.delete(APP_NAME)
            ray.shutdown()


if __name__ == "__main__":
    main()
