"""In-process relay and connector fixtures: the real services on free ports, in the test's nursery."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from connector.app import Connector
from connector.config import ConnectorConfig, parse_printer
from relay.app import Relay
from relay.auth import new_token
from relay.config import RelayConfig
from tunnel.session import H2Stream


async def no_streams(stream: H2Stream) -> None:
    """A connector handler for tunnels that must never carry a job (refused, unverified, never up)."""
    raise AssertionError(f"no stream expected, got {stream.method} {stream.path}")


@dataclass
class RelayStack:
    relay: Relay
    api_url: str
    tunnel_url: str
    api_token: str
    nursery: trio.Nursery
    tmp_path: Path
    connectors: list[Connector] = field(default_factory=list)

    @property
    def tunnel_port(self) -> int:
        return int(self.tunnel_url.rsplit(":", 1)[1].split("/")[0])

    async def token(self, kind: str, tenant: str = "acme", **kw: Any) -> str:
        secret, record = new_token(tenant, kind, **kw)
        await self.relay.store.add_token(record)
        return secret

    async def start_connector(
        self,
        printers: dict[str, str],
        *,
        tenant: str = "acme",
        connector_id: str = "site-1",
        token_expires_in: float | None = None,
        token: str | None = None,
        **kw: Any,
    ) -> Connector:
        """A connector serving ``printers``, with ``token`` (made over the API, say) or a new token."""
        if token is None:
            token = await self.token(
                "connector", tenant, connector_id=connector_id, expires_in=token_expires_in
            )
        connector = Connector(
            self._config(printers, token, self.tmp_path / f"connector-{connector_id}", **kw)
        )
        await self.nursery.start(connector.run)
        self.connectors.append(connector)
        with trio.fail_after(10):
            while len(self.relay.registry.sessions()) < len(self.connectors):
                await self.relay.registry.changed.wait()
        return connector

    async def stoppable_connector(self, printers: dict[str, str], **kw: Any) -> trio.CancelScope:
        """A connector in a cancel scope of its own: cancelling it stops the connector the way a crash
        does, mid-delivery; its state directory survives, as a disk does, for the next one."""
        token = await self.token("connector", "acme", connector_id="site-1")
        config = self._config(printers, token, self.tmp_path / "connector", **kw)
        scope = trio.CancelScope()

        async def run(task_status: trio.TaskStatus[None]) -> None:
            with scope:
                await Connector(config).run(task_status=task_status)

        await self.nursery.start(run)
        with trio.fail_after(10):
            while not self.relay.registry.sessions():
                await self.relay.registry.changed.wait()
        return scope

    def _config(self, printers: dict[str, str], token: str, state_dir: Path, **kw: Any) -> ConnectorConfig:
        return ConnectorConfig(
            relay=self.tunnel_url,
            token=token,
            printer=[parse_printer(f"{k}={v}") for k, v in printers.items()],
            state_dir=state_dir,
            **kw,
        )

    def client(self, token: str | None = None) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.api_url,
            headers={"authorization": f"Bearer {token or self.api_token}"},
            timeout=30,
        )

    async def wait_job(
        self, job_id: str, states: tuple[str, ...] = ("completed", "failed"), within: float = 30.0
    ) -> dict[str, Any]:
        """Follow the job's live events (SSE) until it reaches one of ``states``; return the job."""
        async with self.client() as client:
            with trio.fail_after(within):
                async for state in self.watch(client, job_id):
                    if state in states:
                        break
                job: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}")).json()
                return job

    def watch(self, client: httpx.AsyncClient, job_id: str) -> AsyncIterator[str]:
        return job_states(client, job_id)


async def status_rounds_pass(connector: Connector, rounds: int, within: float = 10.0) -> None:
    """Wait until the connector has polled all its printers ``rounds`` more times."""
    target = connector.status_rounds + rounds
    with trio.fail_after(within):
        while connector.status_rounds < target:
            await connector.status_polled.wait()


@pytest.fixture
def relay_overrides() -> dict[str, Any]:
    """RelayConfig fields a test module wants changed: override this fixture in the module."""
    return {}


@pytest.fixture
def relay_backend() -> str:
    """The relay's store: "sqlite" (the default) or "postgres" (parametrize a test over both)."""
    return "sqlite"


@pytest.fixture
async def relay_stack(
    nursery: trio.Nursery,
    tmp_path: Path,
    relay_overrides: dict[str, Any],
    relay_backend: str,
    request: pytest.FixtureRequest,
) -> AsyncIterator[RelayStack]:
    if relay_backend == "postgres":
        relay_overrides = {"database_url": request.getfixturevalue("postgres_url"), **relay_overrides}
    config = RelayConfig(
        **{
            "listen": ("127.0.0.1", 0),
            "tunnel_listen": ("127.0.0.1", 0),
            "data_dir": tmp_path / "relay",
            # Tests are one very busy client (fuzzers send hundreds of requests a second with one
            # token); per-token limits are tested where a test sets them (test_security_tokens.py).
            "rate_limit": 0,
            "webhook_allow_private": True,  # test receivers listen on loopback
            **relay_overrides,
        }
    )
    relay = Relay(config)
    addresses = await nursery.start(relay.run)
    api_token, record = new_token("acme", "api", scopes=("admin",))
    await relay.store.add_token(record)
    yield RelayStack(
        relay=relay,
        api_url=f"http://127.0.0.1:{addresses.http_port}",
        tunnel_url=f"ws://127.0.0.1:{addresses.tunnel_port}/v1/tunnel",
        api_token=api_token,
        nursery=nursery,
        tmp_path=tmp_path,
    )


async def job_states(client: httpx.AsyncClient, job_id: str) -> AsyncIterator[str]:
    """The job's states from GET /v1/jobs/{id}/watch: its history, then each change as it arrives."""
    async with client.stream("GET", f"/v1/jobs/{job_id}/watch") as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                if "state" in event:
                    yield event["state"]
