"""Starting the system D-Bus and avahi-daemon that ippeveprinter needs ("Unable to initialize DNS-SD").

Used by ``printrelay demo`` and the test fixtures. It only starts what is not running, and only as root.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

SYSTEM_BUS_SOCKET = Path("/run/dbus/system_bus_socket")


class DnsSdUnavailable(Exception):
    pass


def system_bus_answers() -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(str(SYSTEM_BUS_SOCKET))
        except OSError:
            return False
    return True


def _run(args: list[str]) -> None:
    result = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    if result.returncode != 0:
        raise DnsSdUnavailable(f"{' '.join(args)} exited {result.returncode}: {result.stderr.strip()}")


def avahi_running() -> bool:
    if shutil.which("avahi-daemon") is None:
        return False
    return subprocess.run(["avahi-daemon", "--check"], capture_output=True, check=False).returncode == 0


def ensure_dns_sd() -> None:
    """Start the system dbus-daemon and avahi-daemon unless they already run."""
    if system_bus_answers() and avahi_running():
        return
    if os.geteuid() != 0:
        raise DnsSdUnavailable("D-Bus or avahi-daemon is not running, and starting them needs root")
    for tool in ("dbus-daemon", "avahi-daemon"):
        if shutil.which(tool) is None:
            raise DnsSdUnavailable(f"{tool} is not installed (Debian packages dbus, avahi-daemon)")
    if not system_bus_answers():
        # A daemon that died leaves its pid file and socket behind, and a new one refuses to start.
        SYSTEM_BUS_SOCKET.parent.mkdir(parents=True, exist_ok=True)
        for stale in (SYSTEM_BUS_SOCKET.parent / "pid", SYSTEM_BUS_SOCKET):
            stale.unlink(missing_ok=True)
        _run(["dbus-daemon", "--system", "--fork"])
    if not avahi_running():
        Path("/run/avahi-daemon/pid").unlink(missing_ok=True)
        _run(["avahi-daemon", "-D", "--no-drop-root", "--no-rlimits"])
