"""A real SNMP agent for tests: net-snmp's snmpd (Debian ``snmpd``) answering a Printer MIB the test writes.

Fixture ``snmp_agent`` -> :class:`SnmpAgent`: snmpd on 127.0.0.1 and a free UDP port, with a private
configuration (read-only community ``public``, a view of the Host Resources printer objects and the Printer
MIB only) whose ``pass_persist`` helper (``printer_mib_agent.py``) serves the values in a JSON file.
:meth:`SnmpAgent.printer` rewrites that file, so a test turns the printer from idle to paper out and back
while the agent runs; :meth:`SnmpAgent.requests` counts the requests snmpd received (its packet dump).
"""

from __future__ import annotations

__all__ = ["SnmpAgent", "free_udp_port", "snmp_agent"]

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import pytest
from fixtures_printers import free_port

from connector.printer_mib import (
    HR_PRINTER_DETECTED_ERROR_STATE,
    HR_PRINTER_STATUS,
    PRT_ALERT_CODE,
    PRT_ALERT_DESCRIPTION,
    PRT_ALERT_GROUP,
    PRT_ALERT_SEVERITY_LEVEL,
    PRT_MARKER_LIFE_COUNT,
)
from connector.snmp import Oid, format_oid

AGENT_HELPER = Path(__file__).with_name("printer_mib_agent.py")
#: the two subtrees the helper answers; snmpd's own Host Resources modules for them are left out (-I)
SUBTREES = ("1.3.6.1.2.1.25.3.5.1", "1.3.6.1.2.1.43")
STARTUP_TIMEOUT = 10.0


def free_udp_port() -> int:
    return free_port(socket.SOCK_DGRAM)


def bits(*numbers: int) -> str:
    """hrPrinterDetectedErrorState's two octets with these bits set (bit 0: the first octet's MSB), in
    the hex form net-snmp's pass protocol takes for ``octet``."""
    value = 0
    for number in numbers:
        value |= 0x8000 >> number
    return f"{value >> 8:02X} {value & 0xFF:02X}"


class SnmpAgent:
    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.values_path = directory / "values.json"
        self.log_path = directory / "snmpd.log"
        self.process: subprocess.Popen[bytes] | None = None

    def printer(
        self,
        *,
        status: int | None = 3,
        errors: Iterable[int] = (),
        alerts: Sequence[tuple[int, int, int, str]] = (),
        life_count: int | None = 1200,
    ) -> None:
        """What the printer says from now on: hrPrinterStatus (3 idle, 4 printing; None: neither it nor
        hrPrinterDetectedErrorState, as an agent without the Printer MIB), the error bits set (1 noPaper,
        4 doorOpen, 5 jammed, ...), its alerts (severity, group, code, description) and its page counter
        (None: the printer has none)."""
        values: dict[Oid, tuple[str, object]] = {}
        if status is not None:
            values[HR_PRINTER_STATUS] = ("integer", status)
            values[HR_PRINTER_DETECTED_ERROR_STATE] = ("octet", bits(*errors))
        if life_count is not None:
            values[PRT_MARKER_LIFE_COUNT] = ("counter", life_count)
        for index, (severity, group, code, description) in enumerate(alerts, start=1):
            for column, kind, value in (
                (PRT_ALERT_SEVERITY_LEVEL, "integer", severity),
                (PRT_ALERT_GROUP, "integer", group),
                (PRT_ALERT_CODE, "integer", code),
                (PRT_ALERT_DESCRIPTION, "string", description),
            ):
                values[(*column, 1, index)] = (kind, value)
        staged = self.values_path.with_suffix(".tmp")
        staged.write_text(json.dumps({format_oid(oid): list(v) for oid, v in values.items()}))
        staged.replace(self.values_path)  # the helper never reads half a file

    def requests(self) -> int:
        """SNMP messages snmpd has received so far (it logs each one with -d)."""
        return self.log().count("Received ")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        conf = self.directory / "snmpd.conf"
        helper = f"{sys.executable} {AGENT_HELPER} {self.values_path}"
        conf.write_text(
            f"agentAddress udp:127.0.0.1:{self.port}\n"
            + "".join(f"view printer included .{subtree}\n" for subtree in SUBTREES)
            + "rocommunity public 127.0.0.1 -V printer\n"
            + "".join(f"pass_persist .{subtree} {helper}\n" for subtree in SUBTREES)
        )
        persistent = self.directory / "persistent"
        persistent.mkdir()
        env = {**os.environ, "SNMP_PERSISTENT_DIR": str(persistent), "MIBS": "", "MIBDIRS": str(persistent)}
        # -f foreground, -C no other configuration file, -d dump every packet (requests() counts them),
        # -Lf its log; -I leaves out snmpd's own hrDevice / hrPrinter tables, which would answer first.
        self.process = subprocess.Popen(
            ["snmpd", "-f", "-C", "-c", str(conf), "-d", "-Lf", str(self.log_path), "-I",
             "-hr_device,hr_print"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while "NET-SNMP version" not in self.log():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"snmpd did not start on udp:127.0.0.1:{self.port}:\n{self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture
def snmp_agent(tmp_path: Path) -> Iterator[SnmpAgent]:
    if shutil.which("snmpd") is None:
        pytest.fail("snmpd is not installed: run scripts/install-system-deps.sh (Debian package snmpd)")
    directory = tmp_path / "snmpd"
    directory.mkdir()
    agent = SnmpAgent(directory, free_udp_port())
    agent.printer()
    agent.start()
    try:
        yield agent
    finally:
        agent.stop()
