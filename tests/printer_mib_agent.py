"""net-snmp ``pass_persist`` helper serving the Printer MIB values a test wrote to a JSON file.

snmpd starts it once and sends it requests on stdin (``PING``; ``get`` / ``getnext`` and an OID; ``set``
...); it answers on stdout: ``PONG``, or the OID, its type and value on three lines, or ``NONE``. The file
(``{"1.3.6...": ["integer", 3], ...}``, types as net-snmp's pass protocol names them) is read again on
every request, so a test changes the printer (idle, paper out, a jam) without restarting anything.

Run as: ``python printer_mib_agent.py VALUES.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def _key(oid: str) -> tuple[int, ...]:
    return tuple(int(part) for part in oid.strip().strip(".").split("."))


def _values(path: Path) -> list[tuple[tuple[int, ...], str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return sorted((_key(oid), kind, value) for oid, (kind, value) in data.items())


def _answer(path: Path, command: str, oid: str) -> str:
    wanted = _key(oid)
    for key, kind, value in _values(path):
        if (command == "get" and key == wanted) or (command == "getnext" and key > wanted):
            return f".{'.'.join(map(str, key))}\n{kind}\n{value}\n"
    return "NONE\n"


def main() -> None:
    path = Path(sys.argv[1])
    while True:
        line = sys.stdin.readline()
        if not line:
            return
        command = line.strip().lower()
        if command == "ping":
            sys.stdout.write("PONG\n")
        elif command in ("get", "getnext"):
            sys.stdout.write(_answer(path, command, sys.stdin.readline()))
        elif command == "set":
            sys.stdin.readline()  # the OID
            sys.stdin.readline()  # the type and value
            sys.stdout.write("not-writable\n")
        else:
            sys.stdout.write("NONE\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
