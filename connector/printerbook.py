"""Which printers this connector serves: the configured ones, changed at run time by the relay.

``--printer ID=URI`` flags are the starting set. The relay can add a printer (adopting a discovered
candidate), change one's URI, or remove one (``POST`` / ``DELETE /v1/printers`` on the tunnel); those
changes are kept in ``STATE_DIR/printers.json`` so a restart serves the same printers. A change made at
run time wins over the flags for the same id, including a removal.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

from connector.config import PRINTER_ID_RE, PrinterSpec, check_printer_uri
from service import bounded_json
from service.private_files import create_private, private_dir

BOOK_FILE = "printers.json"
MAX_REQUEST_BYTES = 16 * 1024
MAX_URI = 2048


def parse_printer_request(body: bytes) -> PrinterSpec:
    """The body of the tunnel's ``POST /v1/printers``: ``{"id": ..., "uri": ...}``, checked."""
    if len(body) > MAX_REQUEST_BYTES:
        raise ValueError(f"printer request exceeds {MAX_REQUEST_BYTES} bytes")
    try:
        obj: Any = bounded_json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"printer request is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ValueError("printer request must be an object with id and uri")
    printer_id, uri = obj.get("id"), obj.get("uri")
    if not isinstance(printer_id, str) or not PRINTER_ID_RE.match(printer_id):
        raise ValueError(f"invalid printer id {printer_id!r}: use letters, digits, '.', '_' or '-'")
    if not isinstance(uri, str) or not uri or len(uri) > MAX_URI:
        raise ValueError(f"printer {printer_id}: uri must be a string of 1 to {MAX_URI} characters")
    check_printer_uri(printer_id, uri)
    return PrinterSpec(printer_id, uri)


class PrinterBook:
    def __init__(self, state_dir: Path, configured: Sequence[PrinterSpec]) -> None:
        self.path = state_dir / BOOK_FILE
        self.added: dict[str, str] = {}
        self.removed: set[str] = set()
        self._load()
        self._specs = {spec.id: spec for spec in configured if spec.id not in self.removed}
        for printer_id, uri in self.added.items():
            self._specs[printer_id] = PrinterSpec(printer_id, uri)

    def _load(self) -> None:
        try:
            obj = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise ValueError(f"{self.path}: unreadable printer book ({exc}); fix or remove it") from None
        for printer_id, uri in dict(obj.get("added", {})).items():
            check_printer_uri(str(printer_id), str(uri))
            self.added[str(printer_id)] = str(uri)
        self.removed = {str(i) for i in obj.get("removed", [])}

    def specs(self) -> list[PrinterSpec]:
        return list(self._specs.values())

    async def put(self, spec: PrinterSpec) -> None:
        self._specs[spec.id] = spec
        self.added[spec.id] = spec.uri
        self.removed.discard(spec.id)
        await self._save()

    async def remove(self, printer_id: str) -> bool:
        if self._specs.pop(printer_id, None) is None:
            return False
        self.added.pop(printer_id, None)
        self.removed.add(printer_id)
        await self._save()
        return True

    async def _save(self) -> None:
        data = json.dumps({"added": self.added, "removed": sorted(self.removed)}, indent=1).encode()

        def write() -> None:
            private_dir(self.path.parent)
            temporary = self.path.with_suffix(".tmp")
            with os.fdopen(create_private(temporary, os.O_WRONLY | os.O_TRUNC), "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)

        await trio.to_thread.run_sync(write)
