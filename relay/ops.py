"""The relay's ``--metrics-listen`` listener: its readiness, and the state sampled before each scrape."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

import trio

from service.ops import OpsListener, register_build_info

if TYPE_CHECKING:
    from relay.app import Relay


async def readiness(relay: Relay) -> str | None:
    """Ready = the store takes writes and the relay accepts jobs (the public /readyz says the same)."""
    try:
        await relay.store.check_writable()
    except Exception as exc:
        return f"store not writable: {exc}"
    if not relay.accepting:
        return "starting or stopping"
    return None


def _statvfs(path: str) -> tuple[int, int]:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


async def sample(relay: Relay) -> None:
    """Gauges that are cheaper to read now than to track on every change."""
    metrics = relay.metrics
    now = time.time()
    sessions = relay.registry.sessions()
    metrics.sessions.set(len(sessions))
    metrics.connectors.set(len({s.key for s in sessions}))
    metrics.ready.set(1 if await readiness(relay) is None else 0)
    metrics.set_store_sample(await relay.store.sample(now), now)
    used, files = await relay.spool.usage()
    root = relay.spool.root if relay.spool.root.exists() else relay.config.data_dir
    avail, size = await trio.to_thread.run_sync(_statvfs, str(root))
    metrics.set_spool(used, files, avail, size)


def ops_listener(relay: Relay) -> OpsListener:
    register_build_info(relay.metrics.registry, "relay")

    async def ready() -> str | None:
        return await readiness(relay)

    async def refresh() -> None:
        await sample(relay)

    return OpsListener(relay.metrics.registry, ready=ready, refresh=refresh)
