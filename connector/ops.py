"""The connector's ``--metrics-listen`` listener: ready once the relay has registered a tunnel session."""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.ops import OpsListener, register_build_info

if TYPE_CHECKING:
    from connector.app import Connector


async def readiness(connector: Connector) -> str | None:
    if connector.tunnel.session is None:
        return f"no tunnel session to {', '.join(connector.config.relay)}"
    if not connector.registered:
        return "tunnel up, not registered by the relay yet"
    return None


def ops_listener(connector: Connector) -> OpsListener:
    register_build_info(connector.metrics.registry, "connector")

    async def ready() -> str | None:
        return await readiness(connector)

    async def refresh() -> None:
        connector.metrics.ledger_entries.set(await connector.ledger.size())

    return OpsListener(connector.metrics.registry, ready=ready, refresh=refresh)
