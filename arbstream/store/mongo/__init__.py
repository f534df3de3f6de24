"""MongoDB: every collection of arbstream, one owner module each.

:mod:`.schema` names the collections and owns their indexes and TTL; :mod:`.client` holds
the connections and the idempotent bulk upserts. Documents: :mod:`.opportunities`,
:mod:`.episodes`, :mod:`.features`, :mod:`.thresholds` (written by the stream job, read by
the CLI), :mod:`.alert_log` (the alert worker's claims and decision log) and :mod:`.ml_eval`
(the live evaluation of the models; the ``models`` mirror is :mod:`arbstream.store.models`).
Every function takes a :class:`~arbstream.store.config.MongoConfig`; datetimes are stored and
returned as aware UTC.
"""
