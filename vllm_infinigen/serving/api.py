"""INFINIGEN's HTTP surface on ``vllm serve``: metrics and a small API.

A ``vllm.endpoint_plugins`` entry point (``infinigen_api``). vLLM loads
endpoint plugins only when ``VLLM_PLUGINS`` names them, and then loads only
the general plugins it names too, so a server runs with::

    VLLM_PLUGINS=infinigen,infinigen_api vllm serve MODEL --attention-backend infinigen

It adds, in the API server process:

* INFINIGEN's metrics (``serving/metrics.py``) at the end of vLLM's own
  ``/metrics`` exposition: each scrape fetches every rank's counters with
  one ``collective_rpc`` (answered by the engine between steps);
* ``GET /infinigen/stats``: every rank's counters as JSON;
* ``GET /infinigen/config``: the effective options, which of them can change
  while serving, and whether changing them over HTTP is enabled;
* ``POST /infinigen/config`` with a JSON object of run-time options (budget,
  policy, recent window, ...): applied on every rank between engine steps,
  so requests in flight continue with the new options from their next step,
  nothing lost. Refused (403) unless the server started with the option
  ``http_reconfigure``; a bad name or value is answered 400 with the
  option's allowed range and changes nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from argparse import Namespace
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import generate_latest as text_exposition
from prometheus_client.openmetrics.exposition import (
    generate_latest as openmetrics_exposition,
)
from starlette.datastructures import State
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vllm_infinigen.config import RUNTIME_OPTIONS, InfiniGenConfig
from vllm_infinigen.patches.platform_config import infinigen_selected
from vllm_infinigen.serving.metrics import InfiniGenCollector, new_registry

logger = logging.getLogger("vllm.infinigen.api")

PLUGIN_NAME = "infinigen_api"


class _Server:
    """What the routes and the metrics middleware share (one per app)."""

    def __init__(self) -> None:
        self.engine: Any = None
        self.config: InfiniGenConfig | None = None
        """Start-up options (``None``: INFINIGEN is not this server's backend)."""
        self.collector = InfiniGenCollector(model_name="")
        self.registry = new_registry(self.collector)
        self.token_hashes: list[bytes] = []
        """The server's API keys (``--api-key``, ``VLLM_API_KEY``), hashed: a
        POST must carry one of them when any is set."""

    def authorized(self, header: str | None) -> bool:
        if not self.token_hashes:
            return True
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        digest = hashlib.sha256(token.encode()).digest()
        return any(secrets.compare_digest(digest, h) for h in self.token_hashes)

    async def snapshots(self) -> list[dict[str, Any]]:
        if self.engine is None or self.config is None:
            return []
        result = await self.engine.collective_rpc("infinigen_stats")
        return list(result)

    async def exposition(self, openmetrics: bool) -> bytes:
        """INFINIGEN's metric families in the requested format (empty when
        the engine cannot be reached: vLLM's own metrics still go out)."""
        try:
            self.collector.snapshots = await self.snapshots()
        except Exception as error:  # noqa: BLE001 - never break /metrics
            logger.warning("INFINIGEN metrics: cannot read the workers: %s", error)
            self.collector.snapshots = []
        if openmetrics:
            body = openmetrics_exposition(self.registry)
            return body.removesuffix(b"# EOF\n")
        return text_exposition(self.registry)


class MetricsAppender:
    """ASGI middleware: appends INFINIGEN's metrics to ``/metrics``.

    The request goes to vLLM's handler without ``Accept-Encoding`` (so its
    body is plain text), and the response is completed with our families,
    in the format vLLM chose (Prometheus text or OpenMetrics, whose ``# EOF``
    stays last).
    """

    def __init__(self, app: ASGIApp, server: _Server) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path.rstrip("/") != "/metrics":
            await self.app(scope, receive, send)
            return
        headers = [
            (k, v)
            for k, v in scope.get("headers", [])
            if k.lower() != b"accept-encoding"
        ]
        scope = {**scope, "headers": headers}
        start: Message = {}
        parts: list[bytes] = []

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body":
                await send(message)
                return
            parts.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = b"".join(parts)
            response_headers = [
                (k, v)
                for k, v in start.get("headers", [])
                if k.lower() != b"content-length"
            ]
            if start.get("status") == 200:
                content_type = next(
                    (v for k, v in response_headers if k.lower() == b"content-type"),
                    b"",
                )
                openmetrics = content_type.startswith(b"application/openmetrics-text")
                extra = await self.server.exposition(openmetrics)
                if openmetrics and body.endswith(b"# EOF\n"):
                    body = body[: -len(b"# EOF\n")] + extra + b"# EOF\n"
                else:
                    body += extra
            response_headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": response_headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, capture)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


def make_router(server: _Server) -> APIRouter:
    router = APIRouter(prefix="/infinigen", tags=["infinigen"])

    def unavailable() -> JSONResponse | None:
        if server.engine is None:
            return _error(503, "the engine is not ready")
        if server.config is None:
            return _error(
                409,
                "INFINIGEN is not this server's attention backend "
                "(start it with --attention-backend infinigen)",
            )
        return None

    @router.get("/stats")
    async def stats() -> JSONResponse:
        """Every rank's INFINIGEN counters."""
        problem = unavailable()
        if problem is not None:
            return problem
        return JSONResponse({"ranks": await server.snapshots()})

    @router.get("/config")
    async def get_config() -> JSONResponse:
        """The effective options (rank 0), which can change while serving,
        and whether POST may change them."""
        problem = unavailable()
        if problem is not None:
            return problem
        assert server.config is not None
        options = await server.engine.collective_rpc("infinigen_options")
        return JSONResponse(
            {
                "options": options[0],
                "runtime_options": list(RUNTIME_OPTIONS),
                "http_reconfigure": server.config.http_reconfigure,
            }
        )

    @router.post("/config")
    async def post_config(request: Request) -> JSONResponse:
        """Change run-time options on every rank (between engine steps)."""
        problem = unavailable()
        if problem is not None:
            return problem
        assert server.config is not None
        if not server.authorized(request.headers.get("Authorization")):
            return _error(401, "Unauthorized: this server has an API key")
        if not server.config.http_reconfigure:
            return _error(
                403,
                "changing INFINIGEN options over HTTP is off; start the server "
                "with the infinigen option http_reconfigure set to true",
            )
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body must be a JSON object of infinigen options")
        if not isinstance(body, dict) or not body:
            return _error(400, "the body must be a non-empty JSON object of options")
        current = await server.engine.collective_rpc("infinigen_options")
        try:  # validated here first: a bad value never reaches a worker
            InfiniGenConfig.from_dict(current[0]).changed(body)
        except (TypeError, ValueError) as error:
            return _error(400, str(error))
        effective = await server.engine.collective_rpc(
            "infinigen_configure", args=(body,)
        )
        logger.info("INFINIGEN options changed over HTTP: %s", body)
        return JSONResponse({"options": effective[0]})

    return router


class InfiniGenEndpoints:
    """The ``infinigen_api`` endpoint plugin (vLLM's ``EndpointPlugin``)."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.server = _Server()

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(make_router(self.server))
        app.add_middleware(MetricsAppender, server=self.server)

    async def init_state(
        self, engine_client: Any, state: State, args: Namespace
    ) -> None:
        if engine_client is None:
            return
        vllm_config = engine_client.vllm_config
        self.server.engine = engine_client
        keys = getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY")]
        if isinstance(keys, str):
            keys = [keys]
        self.server.token_hashes = [
            hashlib.sha256(k.encode()).digest() for k in keys if k
        ]
        self.server.collector.model_name = str(
            vllm_config.model_config.served_model_name
        )
        if infinigen_selected(vllm_config):
            self.server.config = InfiniGenConfig.from_additional_config(
                vllm_config.additional_config
            )
        else:
            logger.info(
                "INFINIGEN API loaded, but INFINIGEN is not the attention backend: "
                "its routes answer 409 and /metrics carries none of its series"
            )
