"""Under the common umask 022 nothing the relay or the connector keeps is readable by other local users:
directories 0700, files 0600. And a copy of the relay's database alone does not reveal webhook secrets."""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures_printers import RawSink
from fixtures_processes import ProcessStack

from relay.secretbox import SecretBox

pytestmark = pytest.mark.e2e


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def modes_under(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root.parent)): mode(p) for p in [root, *root.rglob("*")]}


async def test_state_is_private_whatever_the_umask(
    umask_022: None, process_stack: ProcessStack, raw_sink: RawSink
) -> None:
    stack = process_stack
    stack.start_relay()
    await stack.wait_ready()
    stack.start_connector({"p": raw_sink.uri})
    await stack.wait_printers_online("p")
    async with stack.client() as client:
        # one job held in the spool (a file: more than 64 KiB), one printed
        held = await client.post("/v1/printers/p/jobs?hold=true", content=os.urandom(200_000))
        assert held.status_code == 201, held.text
        printed = await client.post("/v1/printers/p/jobs", content=os.urandom(200_000))
        assert printed.status_code == 201
        hook = await client.post("/v1/webhooks", json={"url": "http://93.184.216.34/hook"})  # public
        assert hook.status_code == 201, hook.text
        secret = hook.json()["secret"]
    await raw_sink.wait_for(1, within=30)

    relay_modes = modes_under(stack.data_dir)
    connector_modes = modes_under(stack.tmp_path / "connector-site-1")
    for name, found in {**relay_modes, **connector_modes}.items():
        path = stack.tmp_path / name
        wanted = 0o700 if path.is_dir() else 0o600
        assert found == wanted, f"{name} is {found:o}, not {wanted:o}"
    kept = set(relay_modes)
    for expected in ("relay-data/relay.sqlite3", "relay-data/relay.sqlite3-wal", "relay-data/secret.key",
                     "relay-data/spool"):  # fmt: skip
        assert expected in kept, sorted(kept)
    assert any(name.endswith(".sealed") for name in kept), sorted(kept)  # the held job's spool file
    assert "connector-site-1/ledger.sqlite3" in connector_modes

    # The database holds the webhook secret sealed; its bytes (WAL included) never hold it in clear.
    raw = b"".join(p.read_bytes() for p in stack.data_dir.glob("relay.sqlite3*"))
    assert secret.encode() not in raw
    assert b"sealed:v1:" in raw
    assert (
        SecretBox.load_or_create(stack.data_dir / "secret.key").open(
            _stored_secret(stack.data_dir / "relay.sqlite3"), hook.json()["id"]
        )
        == secret
    )


def _stored_secret(database: Path) -> str:
    conn = sqlite3.connect(database)
    try:
        (value,) = conn.execute("SELECT secret FROM webhooks").fetchone()
        return str(value)
    finally:
        conn.close()


async def test_an_older_data_dir_is_tightened_and_its_clear_secrets_sealed(
    umask_022: None, process_stack: ProcessStack
) -> None:
    data = process_stack.data_dir
    conn = sqlite3.connect(data / "relay.sqlite3")
    conn.execute(
        "INSERT INTO webhooks (id, tenant, url, events, secret, created_at) "
        "VALUES ('wh_1', 'acme', 'http://h/', ' job.state_changed ', 'whsec_clear', 0)"
    )
    conn.commit()
    conn.close()
    os.chmod(data, 0o755)  # as an older version left them
    os.chmod(data / "relay.sqlite3", 0o644)
    relay = process_stack.start_relay()
    await process_stack.wait_ready()
    relay.stop()
    assert mode(data) == 0o700 and mode(data / "relay.sqlite3") == 0o600
    stored = _stored_secret(data / "relay.sqlite3")
    assert stored.startswith("sealed:v1:")
    assert SecretBox.load_or_create(data / "secret.key").open(stored, "wh_1") == "whsec_clear"


def test_relays_creating_the_secret_key_together_all_use_one_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replicas started together on one volume: one that finds the key file while another is still
    writing it must not read it part-written (it once read it empty and stopped), and all agree."""
    path = tmp_path / "keys" / "secret.key"
    first_writing, second_done = threading.Event(), threading.Event()
    real_fdopen = os.fdopen

    def fdopen(fd: int, *args: Any, **kwargs: Any) -> Any:
        opened = real_fdopen(fd, *args, **kwargs)
        if threading.current_thread().name == "first":  # the first creator stalls before it writes
            first_writing.set()
            assert second_done.wait(10)
        return opened

    monkeypatch.setattr(os, "fdopen", fdopen)
    keys: dict[str, str] = {}

    def create(name: str) -> None:
        keys[name] = SecretBox.load_or_create(path).fingerprint

    first = threading.Thread(target=create, args=("first",), name="first")
    first.start()
    assert first_writing.wait(10)
    create("second")
    second_done.set()
    first.join(10)
    assert keys["first"] == keys["second"]
    assert mode(path) == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["secret.key"]  # no temporary file left


def test_a_key_file_is_made_whole_where_hard_links_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vfat and SMB shares refuse link(2): the file is then made in place, exclusively."""
    from service.private_files import create_whole

    def no_links(src: str, dst: str) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "secret.key"
    assert create_whole(path, b"first\n") is True
    assert create_whole(path, b"second\n") is False  # made meanwhile by another process: kept
    assert path.read_bytes() == b"first\n" and mode(path) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret.key"]
