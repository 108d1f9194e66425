"""The relay's public HTTP/1.1 server (h11 under our own trio loop) and the types handlers use."""

from service.http.message import (
    BodySource,
    BodyTimeout,
    BodyTooLarge,
    ClientDisconnected,
    Handler,
    Headers,
    HTTPError,
    Request,
    RequestBody,
    Response,
)
from service.http.server import HttpLimits, HttpServer

__all__ = [
    "BodySource",
    "BodyTimeout",
    "BodyTooLarge",
    "ClientDisconnected",
    "HTTPError",
    "Handler",
    "Headers",
    "HttpLimits",
    "HttpServer",
    "Request",
    "RequestBody",
    "Response",
]
