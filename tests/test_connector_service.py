"""The connector as a service on a plain machine: `printrelay connector systemd-unit` writes a unit that
systemd's own verifier accepts and whose command line runs a real connector; --token-file; the example
configuration files in docs/examples load as they are."""

from __future__ import annotations

import argparse
import hashlib
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from connector.config import ConnectorConfig
from relay.config import RelayConfig
from service.settings import load
from tests.fixtures_printers import RawSink
from tests.fixtures_processes import ProcessStack, Service, printrelay

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"


def unit_for(*flags: str) -> str:
    return printrelay("connector", "systemd-unit", *flags).stdout


def directives(unit: str) -> dict[str, list[str]]:
    """Each key's values, continuation lines joined."""
    found: dict[str, list[str]] = {}
    for line in unit.replace("\\\n", " ").splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def exec_start_words(unit: str, credentials: Path, state_root: Path) -> list[str]:
    """ExecStart= as systemd runs it (%d, %S and %% expanded; our quoting is a subset of the shell's)."""
    (line,) = directives(unit)["ExecStart"]
    words = shlex.split(line)
    expanded = {"%d": str(credentials), "%S": str(state_root), "%%": "%", "$$": "$"}
    return [re.sub(r"%[dS%]|\$\$", lambda m: expanded[m.group(0)], word) for word in words]


def verify(unit: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (Debian package systemd; scripts/install-system-deps.sh)"
    path = tmp_path / "printrelay-connector.service"
    path.write_text(unit)
    command = [analyze, "verify", "--man=no", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_the_unit_is_hardened_and_systemd_accepts_it_without_a_warning(tmp_path: Path) -> None:
    unit = unit_for(
        "--relay", "wss://relay-a.example.com/v1/tunnel", "--relay", "wss://relay-b.example.com/v1/tunnel",
        "--printer", "office=ipp://10.0.0.5:631/ipp/print", "--printer", "labels=socket://10.0.0.9:9100",
        "--name", 'Floor 2 "east" 100% $HOME', "--drain-grace", "2m",
    )  # fmt: skip
    checked = verify(unit, tmp_path)
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr
    found = directives(unit)
    for key, value in {"DynamicUser": "yes", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
                       "Restart": "on-failure", "StateDirectory": "printrelay-connector",
                       "LoadCredential": "token:/etc/printrelay/connector.token", "CapabilityBoundingSet": "",
                       "PrivateTmp": "yes", "ProtectHome": "yes"}.items():  # fmt: skip
        assert found[key] == [value], key
    assert int(found["TimeoutStopSec"][0]) > 120  # above the drain grace: deliveries finish and report
    words = exec_start_words(unit, Path("/run/credentials/x"), Path("/var/lib"))
    assert words[1:6] == ["connector", "--token-file", "/run/credentials/x/token", "--state-dir",
                          "/var/lib/printrelay-connector"]  # fmt: skip
    assert words[words.index("--name") + 1] == 'Floor 2 "east" 100% $HOME'  # no specifier, no variable
    assert words.count("--relay") == 2 and words.count("--printer") == 2


def test_the_unit_refuses_what_would_leak_or_not_work(tmp_path: Path) -> None:
    (tmp_path / "with-token.toml").write_text('token = "prc_x_y"\n')
    for flags, message in [
        (["--token", "prc_x_y"], "a token on the unit's command line is seen by every user"),
        (["--config", str(tmp_path / "with-token.toml")], "the --config file holds a token"),
        (["--state-dir", "/srv/printrelay"], "--state-dir must lie below /var/lib"),
        (["--token-file", "token.txt"], "--token-file must be an absolute path"),
        (["--relay", "ws://10.0.0.1/v1/tunnel"], "is not encrypted"),
        (["--printer", "p=gopher://x"], "unsupported URI"),
    ]:
        result = printrelay("connector", "systemd-unit", *flags, check=False)
        assert result.returncode == 1 and result.stdout == "", flags
        assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr


async def test_the_units_command_line_runs_a_connector_that_prints(
    process_stack: ProcessStack, raw_sink: RawSink, tmp_path: Path
) -> None:
    stack = process_stack
    stack.start_relay()
    await stack.wait_ready()
    credentials = tmp_path / "credentials"
    credentials.mkdir(mode=0o700)
    (credentials / "token").write_text(stack.token("connector", "acme", "--connector", "unit-1") + "\n")
    unit = unit_for(
        "--relay", f"ws://127.0.0.1:{stack.tunnel_port}/v1/tunnel", "--printer", f"labels={raw_sink.uri}",
        "--name", "unit 1", "--status-interval", "1s",
    )  # fmt: skip
    words = exec_start_words(unit, credentials, tmp_path / "state")
    assert words[0] == str(Path(sys.executable).parent / "printrelay") and words[1] == "connector"
    connector = Service("unit connector", words[1:], tmp_path / "unit-connector.log")
    connector.start()
    stack.services.append(connector)
    await stack.wait_printers_online("labels")
    body = b"\x1b@label from a systemd unit\n"
    async with stack.client() as client:
        response = await client.post("/v1/printers/labels/jobs", content=body,
                                     headers={"content-type": "application/octet-stream"})  # fmt: skip
        assert response.status_code == 201, response.text
    (document,) = await raw_sink.wait_for(1, within=30)
    assert (document.size, document.sha256) == (len(body), hashlib.sha256(body).hexdigest())
    assert connector.process is not None and connector.process.poll() is None


def test_token_file_errors_are_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "two").write_text("prc_a_b\nprc_c_d\n")
    (tmp_path / "big").write_text("x" * 5000)
    (tmp_path / "good").write_text("prc_a_b\n")
    base = ["connector", "--state-dir", str(tmp_path / "state"), "--relay", "ws://127.0.0.1:9/v1/tunnel"]
    for flags, message in [
        (["--token-file", str(tmp_path / "missing")], "No such file or directory"),
        (["--token-file", str(tmp_path / "empty")], "expected one token on one line"),
        (["--token-file", str(tmp_path / "two")], "expected one token on one line"),
        (["--token-file", str(tmp_path / "big")], "larger than 4096 bytes"),
        (["--token-file", str(tmp_path / "good"), "--token", "prc_a_b"], "--token or --token-file, not both"),
    ]:
        result = printrelay(*base, *flags, check=False)
        assert result.returncode == 1, result
        assert message in result.stderr and result.stderr.startswith("printrelay: "), result.stderr


@pytest.mark.parametrize(("name", "cls"), [("relay.toml", RelayConfig), ("connector.toml", ConnectorConfig)])
def test_the_example_configuration_files_load(name: str, cls: type[RelayConfig | ConnectorConfig]) -> None:
    config = load(cls, argparse.Namespace(config=str(EXAMPLES / name)), environ={})
    if isinstance(config, ConnectorConfig):
        assert config.token_file == Path("/etc/printrelay/connector.token") and not config.token
        assert [p.id for p in config.printer] == ["office", "labels", "legacy"] and config.drain_grace == 60
    else:
        assert config.database_url == "" and config.job_ttl == 14 * 86400 and config.drain_grace == 20


def test_the_example_connector_configuration_makes_a_unit(tmp_path: Path) -> None:
    example = str(EXAMPLES / "connector.toml")
    unit = unit_for("--config", example, "--token-file", "/etc/printrelay/site.token")
    checked = verify(unit, tmp_path)
    assert checked.returncode == 0 and checked.stderr == "", checked.stderr
    assert directives(unit)["LoadCredential"] == ["token:/etc/printrelay/site.token"]
    assert int(directives(unit)["TimeoutStopSec"][0]) > 60
