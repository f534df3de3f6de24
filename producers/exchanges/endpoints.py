"""Pointing a cryptofeed Feed class at other URLs (a local replay server, a proxy).

:func:`with_endpoints` subclasses a Feed with rebased websocket and REST endpoints and an
optional TLS context; :class:`TLSHTTPAsyncConn` is the REST connection that uses that context.
"""

from __future__ import annotations

import dataclasses
import ssl
import urllib.parse
from typing import Any

import aiohttp
from cryptofeed.connection import HTTPAsyncConn, WSAsyncConn
from cryptofeed.feed import Feed


def _rebase(original: str, override: str) -> str:
    """Put ``original``'s path on ``override``'s scheme and host, unless override has a path."""
    new = urllib.parse.urlsplit(override)
    if new.path not in ("", "/") or new.query:
        return override
    old = urllib.parse.urlsplit(original)
    return urllib.parse.urlunsplit((new.scheme, new.netloc, old.path, old.query, ""))


class TLSHTTPAsyncConn(HTTPAsyncConn):
    """cryptofeed's async REST connection with a caller-supplied TLS context."""

    def __init__(self, conn_id: str, proxy: Any, ssl_context: ssl.SSLContext) -> None:
        super().__init__(conn_id, proxy)
        self._ssl_context = ssl_context

    async def _open(self) -> None:
        if not self.is_open:
            connector = aiohttp.TCPConnector(ssl=self._ssl_context)
            self.conn = aiohttp.ClientSession(connector=connector)
            self.sent = 0
            self.received = 0
            self.last_message = None


def with_endpoints(cls: type[Feed], *, ws_url: str | None = None, rest_url: str | None = None,
                   ssl_context: ssl.SSLContext | None = None) -> type[Feed]:
    """Subclass of ``cls`` whose websocket/REST endpoints point at other URLs.

    A URL without a path replaces only scheme, host and port, and each endpoint keeps its own
    path and routes (``wss://127.0.0.1:9000`` + Gemini → ``wss://127.0.0.1:9000/v2/marketdata/``);
    a URL with a path replaces the address whole. ``ws://`` is accepted (cryptofeed itself
    insists on ``wss://``). ``ssl_context`` goes to the websocket connections; the feed id (and
    so cryptofeed's symbol cache) is unchanged.
    """
    attrs: dict[str, Any] = {"__module__": __name__, "__doc__": f"{cls.__name__} at {ws_url}"}
    plain_ws = bool(ws_url and ws_url.startswith("ws://"))
    if ws_url or ssl_context:
        endpoints = []
        for ep in cls.websocket_endpoints:
            address = _rebase(ep.address, ws_url) if ws_url else ep.address
            if plain_ws:
                address = "wss://" + address[len("ws://"):]
            options = dict(ep.options or {})
            if ssl_context is not None and not plain_ws:
                options["ssl"] = ssl_context
            endpoints.append(dataclasses.replace(ep, address=address, sandbox=None,
                                                 options=options))
        attrs["websocket_endpoints"] = endpoints
    if rest_url:
        attrs["rest_endpoints"] = [
            dataclasses.replace(ep, address=_rebase(ep.address, rest_url), sandbox=None)
            for ep in cls.rest_endpoints
        ]
    if plain_ws:
        def connect(self: Feed) -> list:
            conns = cls.connect(self)
            for conn, *_ in conns:
                if isinstance(conn, WSAsyncConn) and conn.address.startswith("wss://"):
                    conn.address = "ws://" + conn.address[len("wss://"):]
            return conns

        attrs["connect"] = connect
    return type(f"{cls.__name__}Endpoints", (cls,), attrs)
