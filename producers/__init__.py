"""Market-data producers: live websocket feeds (cryptofeed and our own adapters) and replays of
recorded data (IAQF bars, Binance frames, CSV), published to the per-exchange Kafka topics.

* :mod:`producers.exchanges`: exchange adapters, registry and normalization to FeedEvents;
* :mod:`producers.live`: ``produce`` and ``record``, over :mod:`producers.publisher` (the Kafka
  producer) and :mod:`producers.resilience` (reconnects, watchdog, dead letters);
* :mod:`producers.spool`, :mod:`producers.kafka_errors`, :mod:`producers.errors`: the optional
  on-disk spool, what a Kafka error means, and how a producer stops (exit codes);
* :mod:`producers.replay`: recorded inputs published to Kafka;
* :mod:`producers.capture`: cryptofeed's raw capture format;
* :mod:`producers.config`: the slices of ``Settings`` used here;
* :mod:`producers.cli`: the ``produce``, ``record`` and ``replay`` commands.
"""
