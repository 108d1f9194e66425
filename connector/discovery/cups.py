"""Discovery of the host's CUPS queues: CUPS-Get-Printers (a CUPS vendor IPP operation) to cupsd."""

from __future__ import annotations

from connector.delivery import DeliveryError, IppBackend
from connector.delivery.cups import default_server
from connector.discovery.naming import suggest_id
from ipp import DelimiterTag, Operation, ValueTag
from tunnel.messages import PrinterCandidate

#: a site with more queues than this has a print server to federate, not a queue list to adopt
MAX_QUEUES = 1000


async def cups_queues(server: tuple[str, int] | None = None) -> list[PrinterCandidate]:
    """Every queue cupsd knows, as ``cups:`` candidates; an unreachable cupsd means none (not an error).

    ``server`` defaults to ``CUPS_SERVER`` or ``localhost:631``, and then the URIs are ``cups:QUEUE``
    (the default server); for another server they name it: ``cups://HOST:PORT/QUEUE``.
    """
    explicit = server is not None
    host, port = server or default_server()
    shown = f"[{host}]" if ":" in host else host
    backend = IppBackend(f"ipp://{shown}:{port}/", connect_timeout=3, io_timeout=10)
    request = backend.new_request(Operation.CUPS_GET_PRINTERS)
    request.operation.add(
        "requested-attributes", ValueTag.KEYWORD, "printer-name", "printer-make-and-model", "printer-info"
    )
    request.operation.add("limit", ValueTag.INTEGER, MAX_QUEUES)
    try:
        response = await backend.send(request)
    except DeliveryError:
        return []
    found = []
    for group in response.groups_of(DelimiterTag.PRINTER_ATTRIBUTES):
        name = group.get("printer-name")
        if name is None or not isinstance(name.value, str):
            continue
        queue = name.value
        model = group.get("printer-make-and-model")
        uri = f"cups://{shown}:{port}/{queue}" if explicit else f"cups:{queue}"
        found.append(
            PrinterCandidate(
                uri=uri,
                name=queue,
                source="cups",
                make_and_model=model.value if model is not None and isinstance(model.value, str) else "",
                suggested_id=suggest_id(queue),
            )
        )
    return found
