"""Printer ids for discovered printers: what an admin would type, valid as ``--printer ID=URI``."""

from __future__ import annotations

import re

from connector.config import PRINTER_ID_RE


def suggest_id(name: str) -> str:
    """``"HP LaserJet 4 (Floor 2)"`` -> ``"hp-laserjet-4-floor-2"``; ``"printer"`` when nothing is left."""
    slug = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-._")[:63].rstrip("-._")
    return slug if PRINTER_ID_RE.match(slug) else "printer"
