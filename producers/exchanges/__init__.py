"""Exchange adapters: cryptofeed feeds → canonical :class:`~producers.events.FeedEvent`\\ s.

cryptofeed (2.4.1) owns the websocket protocols: one :class:`cryptofeed.feed.Feed` subclass per
exchange parses frames into cryptofeed ``Ticker``/``Trade``/``OrderBook`` objects. This package
adds what arbstream needs on top, split the way cryptofeed is:

* one module per exchange that needs code of its own: :mod:`~producers.exchanges.coinbase`
  (the public Coinbase Exchange ws-feed, a Feed of our own), :mod:`~producers.exchanges.binance`
  (raw ``@trade`` trades, deep snapshots), :mod:`~producers.exchanges.bitstamp` (µs snapshot
  sync), :mod:`~producers.exchanges.kraken` and :mod:`~producers.exchanges.bitfinex` (what their
  raw messages carry); :mod:`~producers.exchanges.l2` applies book levels for them and
  :mod:`~producers.exchanges.profile` describes an exchange's extras;
* :mod:`~producers.exchanges.registry`: exchange id → Feed class and profile. Every other
  cryptofeed exchange (Gemini, OKX, Bybit...) is there by configuration only;
* :mod:`~producers.exchanges.normalize`: canonical symbols and record building;
* :mod:`~producers.exchanges.feed`: :func:`~producers.exchanges.feed.make_feed`, a Feed for
  canonical symbols and channels whose callbacks emit FeedEvents, optionally pointed at other
  URLs (:mod:`~producers.exchanges.endpoints`).
"""
