"""The ``--metrics-listen`` listener both programs run: ``/metrics``, ``/healthz`` and ``/readyz``.

Why a listener of its own: scrapes and probes stay off the public port (nothing about the fleet leaks to
the internet), and they keep answering while the API is saturated. One implementation serves relay and
connector; each passes its registry, a readiness check and a refresh that samples state which is cheaper
to read at scrape time than to track on every change (queue depth, spool usage, ledger size).
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Awaitable, Callable
from importlib import metadata

import trio
from prometheus_client import CollectorRegistry, Info
from prometheus_client.exposition import choose_encoder

from service.http.message import HTTPError, Request, Response
from service.http.server import HttpLimits, HttpServer

log = logging.getLogger("printrelay.ops")

# Answers None when ready, else why not (shown in the 503 body and the log).
Readiness = Callable[[], Awaitable[str | None]]
Refresh = Callable[[], Awaitable[None]]

# A scrape must not hang on a stuck store: past this the last sampled values are served.
REFRESH_TIMEOUT = 5.0
READY_TIMEOUT = 5.0
# Prometheus and kubelets hold few connections; the bounds only keep a misbehaving client small.
OPS_LIMITS = HttpLimits(max_header_bytes=16 * 1024, max_connections=64, keepalive_timeout=120.0)


def version() -> str:
    try:
        return metadata.version("printrelay")
    except metadata.PackageNotFoundError:
        return "unknown"


def register_build_info(registry: CollectorRegistry, component: str) -> None:
    """``printrelay_build_info{component, version, python}`` = 1: which build runs where."""
    info = Info("printrelay_build", "Build of this process", registry=registry)
    info.info({"component": component, "version": version(), "python": platform.python_version()})


class OpsListener:
    """Serves one process's metrics and probes; :meth:`serve` runs until cancelled."""

    def __init__(
        self, registry: CollectorRegistry, *, ready: Readiness, refresh: Refresh | None = None
    ) -> None:
        self.registry = registry
        self.ready = ready
        self.refresh = refresh
        self.http = HttpServer(self.handle, OPS_LIMITS, server_header="printrelay-ops")

    async def serve(
        self, host: str, port: int, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await self.http.serve(host, port, task_status=task_status)

    async def handle(self, request: Request) -> Response:
        if request.path not in ("/metrics", "/healthz", "/readyz"):
            raise HTTPError(404, f"no such resource: {request.path} (try /metrics, /healthz or /readyz)")
        if request.method not in ("GET", "HEAD"):
            raise HTTPError(405, f"method {request.method} not allowed", [("allow", "GET, HEAD")])
        if request.path == "/healthz":
            return Response.json({"status": "alive"})
        if request.path == "/readyz":
            return await self._readyz()
        return await self._metrics(request)

    async def _readyz(self) -> Response:
        with trio.move_on_after(READY_TIMEOUT):
            reason = await self.ready()
            if reason is None:
                return Response.json({"status": "ready"})
            return Response.json({"status": "not ready", "reason": reason}, 503)
        return Response.json({"status": "not ready", "reason": f"no answer within {READY_TIMEOUT:g} s"}, 503)

    async def _metrics(self, request: Request) -> Response:
        if self.refresh is not None:
            try:
                with trio.fail_after(REFRESH_TIMEOUT):
                    await self.refresh()
            except trio.TooSlowError:
                log.warning("metrics refresh took over %g s; serving the last values", REFRESH_TIMEOUT)
            except Exception:
                # A failing sample (store down) must not hide every other metric: serve the last values.
                log.exception("metrics refresh failed; serving the last values")
        encoder, content_type = choose_encoder(request.headers.get("accept") or "")
        return Response(200, [("content-type", content_type)], encoder(self.registry))
