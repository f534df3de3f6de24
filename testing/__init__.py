"""Test and benchmark infrastructure; NOT shipped (``pyproject.toml`` packages only
``arbstream``, ``producers``, ``spark_jobs`` and ``alerts``).

* :mod:`testing.replay_server`: a local TLS websocket + REST server replaying recorded exchange
  frames, so the live producers run end to end without the internet;
* :mod:`testing.recorded_rest`: cryptofeed's REST symbol lists and book snapshots answered from
  recorded bodies;
* :mod:`testing.tls`: a throwaway certificate authority (``trustme``) for ``127.0.0.1``.

The product never imports this package (nor ``trustme``, a test dependency).
"""
