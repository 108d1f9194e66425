"""QR codes that take a person to a printer's release page: ``{public_url}/release/{printer_id}``.

A pull printer holds each job until its owner, standing at the printer, scans the code on it and releases
their jobs there (relay/portal). Codes are drawn by segno, as SVG (the console's printable sheet) or PNG.
"""

from __future__ import annotations

import io
import re
from urllib.parse import quote

import segno

from service.http.message import HTTPError, Request

MIN_SCALE, MAX_SCALE, DEFAULT_SCALE = 1, 20, 6
# A Host header the relay may put in a URL: a name or an IPv4/IPv6 address, and a port.
HOST_RE = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])(?::\d{1,5})?$"
)


def base_url(public_url: str, request: Request, *, tls: bool) -> str:
    """Where people reach the relay: ``public_url``, or else the address this request came to."""
    if public_url:
        return public_url.rstrip("/")
    host = request.headers.get("host") or ""
    if not HOST_RE.match(host):
        raise HTTPError(
            409, "set the relay's public_url: this request has no usable Host header to build URLs"
        )
    return f"{'https' if tls else 'http'}://{host}"


def release_url(base: str, printer_id: str) -> str:
    return f"{base}/release/{quote(printer_id, safe='')}"


def _code(url: str) -> segno.QRCode:
    return segno.make(url, error="m", micro=False)


def image(url: str, kind: str, scale: int = DEFAULT_SCALE) -> tuple[bytes, str]:
    """The code as ``kind`` ("svg" or "png") and its content type."""
    if kind not in ("svg", "png"):
        raise ValueError(f"a QR code is svg or png, not {kind!r}")
    out = io.BytesIO()
    extra = {"title": url} if kind == "svg" else {}  # an SVG says what it points at (screen readers)
    _code(url).save(out, kind=kind, scale=scale, border=4, **extra)
    return out.getvalue(), "image/svg+xml" if kind == "svg" else "image/png"


def inline_svg(url: str, scale: int = DEFAULT_SCALE) -> str:
    """The code as an ``<svg>`` element to place in a page (the console's sheet)."""
    return str(_code(url).svg_inline(scale=scale, border=4, title=url, omitsize=True))


def scale_param(request: Request) -> int:
    values = request.query.get("scale")
    if not values:
        return DEFAULT_SCALE
    try:
        scale = int(values[-1])
    except ValueError:
        raise HTTPError(400, f"scale must be an integer, not {values[-1][:20]!r}") from None
    if not MIN_SCALE <= scale <= MAX_SCALE:
        raise HTTPError(400, f"scale must be between {MIN_SCALE} and {MAX_SCALE}")
    return scale
