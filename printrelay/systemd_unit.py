"""``printrelay connector systemd-unit [connector flags...]``: a hardened systemd service for a connector.

The unit runs the connector as a dynamic user with its state (keys, delivery ledger) in systemd's
StateDirectory, the token as a systemd credential (root-readable file, handed to the service alone, never on
a command line), the file system read-only around it, and a stop timeout above the connector's drain grace
so that SIGTERM lets deliveries finish and report.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from connector.config import ConnectorConfig
from printrelay import program
from service.settings import add_arguments, flag_name, load

DEFAULT_TOKEN_FILE = "/etc/printrelay/connector.token"
DEFAULT_STATE_DIRECTORY = "printrelay-connector"
STOP_MARGIN = 30  # seconds above drain_grace: the last reports and the tunnel's goodbye

# Flags the unit sets itself, from systemd's own directories.
_OWNED = {"token_file", "state_dir", "token"}


def main_systemd_unit(argv: Sequence[str] | None = None) -> int:
    """Parses ``argv`` (connector flags plus the unit's own) and prints the unit."""
    parser = argparse.ArgumentParser(
        prog="printrelay connector systemd-unit",
        description="Print a systemd service unit that runs `printrelay connector` with these flags. "
        "Install it with: printrelay connector systemd-unit --relay wss://... --printer ID=URI "
        "> /etc/systemd/system/printrelay-connector.service; put the token in the --token-file "
        f"(default {DEFAULT_TOKEN_FILE}, mode 0600, owner root); systemctl enable --now printrelay-connector",
    )
    parser.add_argument(
        "--executable", metavar="PATH", help="the printrelay program the unit starts (default: this one)"
    )
    add_arguments(parser, ConnectorConfig)
    args = parser.parse_args(argv)
    print(systemd_unit(args), end="")
    return 0


def systemd_unit(args: argparse.Namespace) -> str:
    """The unit for the connector flags in ``args`` (as parsed by :func:`add_arguments`)."""
    given = {key: value for key, value in vars(args).items() if key != "executable"}
    if "token" in given:
        raise ValueError(
            "a token on the unit's command line is seen by every user of the machine: put it in a file "
            f"(mode 0600) and give --token-file FILE (default {DEFAULT_TOKEN_FILE})"
        )
    token_file = str(given.pop("token_file", DEFAULT_TOKEN_FILE))
    if not PurePosixPath(token_file).is_absolute():
        raise ValueError(f"--token-file must be an absolute path, not {token_file!r}")
    state_directory = _state_directory(given.pop("state_dir", None))
    # Checked as the connector will check them (the environment of whoever writes the unit does not count).
    config = load(ConnectorConfig, argparse.Namespace(**given), environ={})
    if config.token:
        raise ValueError("the --config file holds a token: move it to the --token-file, mode 0600")
    executable = args.executable or _this_printrelay()
    state = f"%S/{state_directory}"
    flags = [f"{_quote(executable)} connector", "--token-file", "%d/token", "--state-dir", state]
    flags += [_quote(word) for word in _flags(given)]
    stop_timeout = int(config.drain_grace) + STOP_MARGIN
    return UNIT.format(
        exec_start=" \\\n    ".join(_lines(flags)),
        token_file=_quote(token_file),
        state_directory=state_directory,
        stop_timeout=stop_timeout,
        drain_grace=f"{config.drain_grace:g}",
    )


def _state_directory(state_dir: str | None) -> str:
    """The StateDirectory= name: a --state-dir must lie below /var/lib, where systemd keeps it for units."""
    if state_dir is None:
        return DEFAULT_STATE_DIRECTORY
    path = PurePosixPath(state_dir)
    if path.parts[:3] != ("/", "var", "lib") or len(path.parts) < 4 or ".." in path.parts:
        raise ValueError(
            f"--state-dir must lie below /var/lib (systemd's StateDirectory= for the unit), not {state_dir!r}"
        )
    return "/".join(path.parts[3:])


def _flags(given: dict[str, object]) -> list[str]:
    """The given settings back as command-line words, in the order the connector declares them."""
    words: list[str] = []
    if "config" in given:
        words += ["--config", str(given.pop("config"))]
    for field in dataclasses.fields(ConnectorConfig):
        if field.name not in given or field.name in _OWNED:
            continue
        value = given[field.name]
        flag = flag_name(field)
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, list):
            for item in value:
                words += [flag, str(item)]
        else:
            words += [flag, str(value)]
    return words


def _lines(words: list[str]) -> list[str]:
    """ExecStart= split into lines: a flag together with its value."""
    lines: list[str] = []
    for word in words:
        if lines and not word.startswith("--") and lines[-1].startswith("--") and " " not in lines[-1]:
            lines[-1] += " " + word
        else:
            lines.append(word)
    return lines


def _quote(word: str) -> str:
    """One word of ExecStart=: specifiers (%) and variables ($) kept literal, quoted when it has to be."""
    if "\n" in word or "\r" in word:
        raise ValueError(f"a flag value cannot hold a line break: {word!r}")
    word = word.replace("%", "%%").replace("$", "$$")
    if word and not re.search(r"[\s\"'\\;]", word):
        return word
    return '"' + word.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _this_printrelay() -> str:
    found = program()
    if not Path(found).is_absolute():
        raise ValueError("cannot find the printrelay program: give --executable PATH")
    return found


UNIT = """\
# printrelay connector: delivers print jobs from the relay to this network's printers.
# The token (printrelay token create --kind connector) in {token_file},
# mode 0600, owner root: systemd hands it to this service alone.
# Keys and the delivery ledger in /var/lib/{state_directory}: back it up (jobs sealed to this
# connector's key cannot be read by another).
[Unit]
Description=printrelay connector
Wants=network-online.target
After=network-online.target

[Service]
Type=exec
ExecStart={exec_start}
Environment=PRINTRELAY_LOG_FORMAT=json
LoadCredential=token:{token_file}
DynamicUser=yes
StateDirectory={state_directory}
StateDirectoryMode=0700
UMask=0077
# SIGTERM: deliveries in flight get the drain grace ({drain_grace} s) to finish and report, then a margin.
KillMode=mixed
TimeoutStopSec={stop_timeout}
Restart=on-failure
RestartSec=5

NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
CapabilityBoundingSet=
AmbientCapabilities=
# Printers (IPP, RAW, LPD), the relay, CUPS's socket and DNS-SD through D-Bus.
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK
SystemCallArchitectures=native
SystemCallFilter=@system-service

[Install]
WantedBy=multi-user.target
"""
