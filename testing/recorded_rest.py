"""cryptofeed's REST calls answered from recorded bodies, for tests and benchmarks.

Test and benchmark infrastructure, not shipped. cryptofeed reads an exchange's REST symbol list
when a Feed is built and fetches book snapshots over REST; :func:`preload_symbols` loads the
symbol lists from recorded REST bodies (``{url: body}``, e.g. the ``-> `` lines of a cryptofeed
capture, :func:`producers.capture.read_rest_capture`) and :meth:`RestBodies.aread` stands in
for ``feed.http_conn.read`` to serve snapshots.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from cryptofeed.connection import HTTPSync
from yapic import json

from producers.exchanges.normalize import symbol_map
from producers.exchanges.registry import feed_class


class RestBodies:
    """Recorded REST responses looked up by URL, ignoring scheme and host.

    Match order: same path and query; same path and query apart from ``limit``; then a unique
    entry whose last path segment is a prefix of (or extends) the requested one within the
    same folder (``pub:list:pair:future`` answers ``pub:list:pair:futures``).

    Args:
        bodies: ``{url: body text}``.
    """

    def __init__(self, bodies: Mapping[str, str]) -> None:
        self._entries = [(self._split(url), body) for url, body in bodies.items()]

    @staticmethod
    def _split(url: str) -> tuple[str, tuple[tuple[str, str], ...]]:
        parts = urllib.parse.urlsplit(url)
        return parts.path.rstrip("/"), tuple(sorted(urllib.parse.parse_qsl(parts.query)))

    def lookup(self, url: str, params: Mapping[str, Any] | None = None) -> str:
        """Body recorded for ``url`` (plus query ``params``).

        Raises:
            KeyError: nothing recorded matches.
        """
        path, query = self._split(url)
        if params:
            query = tuple(sorted({**dict(query), **{k: str(v) for k, v in params.items()}}.items()))
        for (p, q), body in self._entries:
            if p == path and q == query:
                return body
        loose = tuple(kv for kv in query if kv[0] != "limit")
        for (p, q), body in self._entries:
            if p == path and tuple(kv for kv in q if kv[0] != "limit") == loose:
                return body
        folder, _, leaf = path.rpartition("/")
        near = [
            body for (p, _q), body in self._entries
            if p.rpartition("/")[0] == folder
            and (p.rpartition("/")[2].startswith(leaf) or leaf.startswith(p.rpartition("/")[2]))
            and p.rpartition("/")[2]
        ]
        if len(near) == 1:
            return near[0]
        raise KeyError(f"no recorded REST body for {url}")

    async def aread(self, address: str, *args: Any, **kwargs: Any) -> str:
        """Drop-in for ``feed.http_conn.read`` (book snapshots) serving recorded bodies."""
        return self.lookup(address, kwargs.get("params"))


class _RecordedHTTP(HTTPSync):
    """cryptofeed's synchronous REST reader, answering from :class:`RestBodies`."""

    def __init__(self, bodies: RestBodies) -> None:
        self.bodies = bodies

    def read(self, address: str, params: Any = None, headers: Any = None, json: bool = False,
             text: bool = True, uuid: Any = None) -> Any:
        body = self.bodies.lookup(address, params)
        return _loads_decimal(body) if json else body


def _loads_decimal(body: str) -> Any:
    return json.loads(body, parse_float=Decimal)


def preload_symbols(exchange: str, bodies: Mapping[str, str]) -> dict[str, str]:
    """Load an exchange's symbol metadata into cryptofeed from recorded REST responses.

    Runs the Feed class's own REST symbol parsing (``_symbol_endpoint_prepare``,
    ``_parse_symbol_data``) on ``bodies`` instead of the network and stores the result with
    ``Symbols.set(feed_id, symbols, info)``, so building the feed makes no REST call for
    symbols. Bodies are matched by URL path (:class:`RestBodies`), so captures of the real
    hosts work for feeds pointed at a local server.

    Args:
        exchange: exchange id (see :func:`producers.exchanges.registry.exchange_id`).
        bodies: ``{url: body}``, e.g. the ``-> `` lines of a cryptofeed capture.

    Returns:
        canonical symbol → the exchange's own symbol (``"IOTA-ETH" → "tIOTETH"``).

    Raises:
        KeyError: a symbol endpoint the feed needs is not in ``bodies``.
        ValueError: unknown exchange.
    """
    cls = feed_class(exchange)
    reader = _RecordedHTTP(RestBodies(bodies))
    had_own = "http_sync" in cls.__dict__
    previous = cls.__dict__.get("http_sync")
    cls.http_sync = reader
    try:
        native = cls.symbol_mapping(refresh=True)
    finally:
        if had_own:
            cls.http_sync = previous
        else:
            del cls.http_sync
    return {canon: native[cf] for canon, cf in symbol_map(cls).items()}
