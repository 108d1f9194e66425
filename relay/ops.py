"""The relay's health as probes and scrapes see it: readiness, and the state sampled before each scrape."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import trio

from relay.metrics import RelayMetrics
from relay.spool import PayloadSpool
from relay.store.base import Store
from relay.tunnel import ConnectorRegistry
from service.ops import OpsListener, register_build_info


def _statvfs(path: str) -> tuple[int, int]:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


class RelayHealth:
    def __init__(
        self,
        store: Store,
        spool: PayloadSpool,
        registry: ConnectorRegistry,
        metrics: RelayMetrics,
        data_dir: Path,
        accepting: Callable[[], bool],
    ) -> None:
        self._store = store
        self._spool = spool
        self._registry = registry
        self._metrics = metrics
        self._data_dir = data_dir
        self._accepting = accepting

    async def readiness(self) -> str | None:
        """Ready = the store takes writes and the relay accepts jobs (not starting, not draining)."""
        try:
            await self._store.check_writable()
        except Exception as exc:
            return f"store not writable: {exc}"
        if not self._accepting():
            return "starting or stopping"
        return None

    async def sample(self) -> None:
        """Gauges that are cheaper to read now than to track on every change."""
        metrics = self._metrics
        now = time.time()
        sessions = self._registry.sessions()
        metrics.sessions.set(len(sessions))
        metrics.connectors.set(len({s.key for s in sessions}))
        metrics.ready.set(1 if await self.readiness() is None else 0)
        metrics.set_store_sample(await self._store.sample(now), now)
        used, files = await self._spool.usage()
        root = self._spool.free_space_path()
        fs = None
        if root is not None:  # payloads on a filesystem, not in the database
            fs = await trio.to_thread.run_sync(_statvfs, str(root if root.exists() else self._data_dir))
        metrics.set_spool(used, files, fs)

    def listener(self) -> OpsListener:
        register_build_info(self._metrics.registry, "relay")
        return OpsListener(self._metrics.registry, ready=self.readiness, refresh=self.sample)
