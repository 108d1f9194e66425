"""The command line: settings precedence, --help, tokens, the tunnel's door, and the demo."""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from fixtures_printers import RawSink
from fixtures_processes import ProcessStack, printrelay
from fixtures_relay import RelayStack
from trio_websocket import ConnectionRejected, open_websocket_url

from printrelay import cli
from printrelay import program as printrelay_program
from printrelay.cli import build_parser
from relay.config import RelayConfig
from relay.runtime import GC_THRESHOLDS
from service.settings import SettingsError, format_duration, format_size, load, parse_duration, parse_size
from tunnel.wsstream import SUBPROTOCOL


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_flag_beats_environment_beats_file_beats_default(tmp_path: Path) -> None:
    config_file = tmp_path / "relay.toml"
    config_file.write_text('listen = "0.0.0.0:9000"\ndata-dir = "/srv/from-file"\nmax_job_bytes = "20MiB"\n')
    env = {"PRINTRELAY_DATA_DIR": "/srv/from-env", "PRINTRELAY_MAX_ATTEMPTS": "9"}
    config = load(RelayConfig, parse("--config", str(config_file), "--max-attempts", "3"), env)
    assert config.listen == ("0.0.0.0", 9000)  # file
    assert config.data_dir == Path("/srv/from-env")  # env beats file
    assert config.max_attempts == 3  # flag beats env
    assert config.max_job_bytes == 20 * 1024 * 1024  # file, with a unit
    assert config.tunnel_listen == ("127.0.0.1", 8081)  # default
    # the config file can come from the environment too
    config = load(RelayConfig, parse(), {"PRINTRELAY_CONFIG": str(config_file)})
    assert config.data_dir == Path("/srv/from-file")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("no_such_setting = 1\n", "unknown setting 'no_such_setting'"),
        ("listen = [\n", "not valid TOML"),
        ('max_job_bytes = "lots"\n', "max_job_bytes: not a size"),
        ('listen = "nowhere"\n', "not HOST:PORT"),
    ],
)
def test_bad_config_files_name_the_setting(tmp_path: Path, content: str, message: str) -> None:
    config_file = tmp_path / "bad.toml"
    config_file.write_text(content)
    with pytest.raises(SettingsError, match=message):
        load(RelayConfig, parse("--config", str(config_file)), {})


def test_help_shows_defaults_and_environment_names() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "printrelay.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    text = " ".join(result.stdout.split())
    assert "--tunnel-listen HOST:PORT" in text
    assert "(default: printrelay-data; env PRINTRELAY_DATA_DIR)" in text
    # defaults as one types them, each read back by the setting's own parser
    for name, default in (("MAX_JOB_BYTES", "1GiB"), ("JOB_TTL", "14d"), ("LISTEN", "127.0.0.1:8080"),
                          ("RETRY_BASE", "2s"), ("TENANT_MAX_SPOOL_BYTES", "50GiB")):  # fmt: skip
        assert f"(default: {default}; env PRINTRELAY_{name})" in text, name
    connector = subprocess.run(
        [sys.executable, "-m", "printrelay.cli", "connector", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "(env PRINTRELAY_TOKEN)" in " ".join(connector.stdout.split())  # a secret: its env, no default


@pytest.mark.parametrize(
    ("seconds", "text"), [(1209600.0, "14d"), (300.0, "5m"), (2.0, "2s"), (0.5, "500ms"), (90.0, "90s")]
)
def test_durations_are_shown_as_typed(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text and parse_duration(text) == seconds


@pytest.mark.parametrize(("size", "text"), [(1073741824, "1GiB"), (65536, "64KiB"), (1000, "1000")])
def test_sizes_are_shown_as_typed(size: int, text: str) -> None:
    assert format_size(size) == text and parse_size(text) == size


def test_version() -> None:
    result = printrelay("--version")
    assert result.stdout.strip() == f"printrelay {importlib.metadata.version('printrelay')}"


RELAY_AND_CONNECTOR = {"relay.app", "connector.app", "relay.users", "argon2", "printrelay.demo"}


@pytest.mark.parametrize(
    ("argv", "not_imported"),
    [
        (["--help"], {*RELAY_AND_CONNECTOR, "trio", "httpx", "relay.config", "connector.config"}),
        (["token", "list", "--help"], {*RELAY_AND_CONNECTOR, "trio", "httpx", "relay.store"}),
        (["jobs", "list", "--help"], {*RELAY_AND_CONNECTOR, "trio", "relay.store"}),
        (["serve", "--help"], {*RELAY_AND_CONNECTOR, "connector.config"}),
        (["connector", "--help"], RELAY_AND_CONNECTOR),
    ],
)
def test_a_command_imports_only_what_it_needs(argv: list[str], not_imported: set[str]) -> None:
    """Start-up stays cheap: every command's options are known without importing the relay or the
    connector, which take a second to import; the tests and people run many short commands."""
    code = (
        "import contextlib, io, sys\n"
        "from printrelay import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()) as shown, contextlib.suppress(SystemExit):\n"
        "    cli.main(sys.argv[1:])\n"
        "assert 'usage: printrelay' in shown.getvalue()\n"
        "print(' '.join(sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    assert not_imported.isdisjoint(result.stdout.split()), not_imported & set(result.stdout.split())


@pytest.mark.parametrize("flag", ["--listen", "--tunnel-listen", "--metrics-listen"])
def test_a_busy_port_is_one_line_naming_the_port_and_the_flag(tmp_path: Path, flag: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {
            "--listen": "127.0.0.1:0",
            "--tunnel-listen": "127.0.0.1:0",
            "--metrics-listen": "127.0.0.1:0",
        }
        ports[flag] = f"127.0.0.1:{port}"
        args = [a for pair in ports.items() for a in pair]
        result = printrelay("serve", "--data-dir", str(tmp_path / "relay"), *args, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"printrelay: cannot listen on 127.0.0.1:{port} ({flag}): Address already in use; choose another "
        f"with {flag}"
    )
    assert "Traceback" not in result.stderr


def test_store_commands_refuse_a_data_dir_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "typo"
    refused = printrelay("token", "create", "--data-dir", str(missing), "--tenant", "acme", "--kind", "api",
                         check=False)  # fmt: skip
    assert refused.returncode == 1 and f"no relay data directory at {missing}" in refused.stderr
    assert not missing.exists()
    made = printrelay(
        "token", "create", "--data-dir", str(missing), "--create", "--tenant", "acme", "--kind", "api"
    )
    assert made.stdout.startswith("pra_") and missing.is_dir()


def test_serve_collects_garbage_less_often_than_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, int, int]] = []

    def run_instead(*args: object) -> None:
        seen.append(gc.get_threshold())  # what the event loop would have run with

    default = gc.get_threshold()
    monkeypatch.setattr(trio, "run", run_instead)
    try:
        assert cli.main(["serve", "--data-dir", str(tmp_path / "data")]) == 0
    finally:
        gc.set_threshold(*default)
    assert seen == [GC_THRESHOLDS]
    assert GC_THRESHOLDS[0] > default[0] and GC_THRESHOLDS[2] > default[2]


def test_a_bad_setting_is_one_readable_line(tmp_path: Path) -> None:
    result = printrelay("serve", "--listen", "nowhere", check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == "printrelay: --listen: not HOST:PORT: 'nowhere'"


async def test_a_bad_token_is_refused_with_401_before_the_upgrade(relay_stack: RelayStack) -> None:
    for token in ("prc_aaaaaaaaaa_" + "b" * 43, await relay_stack.token("api")):
        with pytest.raises(ConnectionRejected) as info:
            async with open_websocket_url(
                relay_stack.tunnel_url,
                subprotocols=[SUBPROTOCOL],
                extra_headers=[(b"authorization", f"Bearer {token}".encode())],
            ):
                pass
        assert info.value.status_code == 401


async def test_a_token_created_while_the_relay_runs_is_honoured_at_once(relay_stack: RelayStack) -> None:
    data_dir = relay_stack.relay.config.data_dir
    result = await trio.to_thread.run_sync(
        lambda: printrelay(
            "token", "create", "--data-dir", str(data_dir), "--tenant", "acme", "--kind", "api"
        )
    )
    token = result.stdout.strip()
    async with relay_stack.client(token) as client:
        assert (await client.get("/v1/jobs")).status_code == 200
    listing = await trio.to_thread.run_sync(lambda: printrelay("token", "list", "--data-dir", str(data_dir)))
    token_id = token.split("_")[1]
    assert token_id in listing.stdout
    await trio.to_thread.run_sync(
        lambda: printrelay("token", "revoke", "--data-dir", str(data_dir), token_id)
    )
    async with relay_stack.client(token) as client:
        response = await client.get("/v1/jobs")
    assert response.status_code == 401 and response.json()["error"] == "token revoked"


def test_the_demo_prints_a_page_through_the_tunnel(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "printrelay.cli", "demo", "--once", "--data-dir", str(tmp_path / "demo"),
         "--listen", "127.0.0.1:0", "--tunnel-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(byte-identical to what was submitted)" in result.stdout
    # the commands it prints run as printed: this installation's program, and its metrics are served
    assert f"{printrelay_program()} submit --relay http://127.0.0.1:" in result.stdout
    assert re.search(r"metrics: +http://127\.0\.0\.1:\d+/metrics", result.stdout), result.stdout
    assert "ippeveprinter on port" in result.stdout  # the real printer, not the fallback
    printed = list((tmp_path / "demo" / "printed").iterdir())
    assert printed and printed[0].read_bytes().startswith(b"%PDF-1.4")


async def test_sigterm_drains_and_stops_relay_and_connector(
    process_stack: ProcessStack, raw_sink: RawSink
) -> None:
    relay = process_stack.start_relay()
    await process_stack.wait_ready()
    connector = process_stack.start_connector({"label": raw_sink.uri})
    await process_stack.wait_printers_online("label")
    for service in (connector, relay):
        assert service.process is not None
        service.process.send_signal(signal.SIGTERM)
        # nothing is in flight, so each stops at once instead of waiting for a second signal
        code = await trio.to_thread.run_sync(lambda p=service.process: p.wait(timeout=10))
        assert code == 0, service.log()


def test_memory_return_collects_young_garbage_and_trims_the_heap(monkeypatch: pytest.MonkeyPatch) -> None:
    """What an abuse storm leaves (cycles of aborted connections, freed heap) goes back between storms."""
    from relay import runtime

    trims: list[int] = []
    keeper = runtime.MemoryReturn()
    assert keeper._trim is not None  # glibc here: the relay's images and hosts run on it
    monkeypatch.setattr(keeper, "_trim", lambda pad: trims.append(pad) or 1)

    class Cycle:
        def __init__(self) -> None:
            self.me = self

    default = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLDS)
    try:
        gc.collect()
        for _ in range(5_000):
            Cycle()  # garbage the 50,000 threshold would leave alone
        assert any(isinstance(o, Cycle) for o in gc.get_objects(generation=0))
        keeper.once()
        assert not any(isinstance(o, Cycle) for o in gc.get_objects())
        assert trims == [0]
    finally:
        gc.set_threshold(*default)
