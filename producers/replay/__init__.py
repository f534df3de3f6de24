"""Replays of recorded market data onto Kafka as canonical records, one module per input:

* :mod:`~producers.replay.iaqf`: the IAQF 1-minute bars, one quote per bar close
  (``arbstream replay iaqf``);
* :mod:`~producers.replay.csv`: a generic tick CSV (``arbstream replay csv``);
* :mod:`~producers.replay.binance`: the raw Binance websocket recording, quotes and trades;

all published by :mod:`~producers.replay.publish` (ordering, pacing, progress, delivery), with
the outcome and errors in :mod:`~producers.replay.errors` and pair names read by
:mod:`~producers.replay.pairs`. All timestamps are integer milliseconds since the epoch, UTC.
"""
