"""The store layer: every MongoDB and InfluxDB access of arbstream, one owner each.

Layering: core (:mod:`arbstream.config`, :mod:`arbstream.schemas`, :mod:`arbstream.timestamps`,
:mod:`arbstream.kafka` ...) → store (this package; imports only core and third-party
libraries) → components (``producers``, ``spark_jobs``, ``alerts``, ``ml``) → CLI shell. The
stream job, the alert worker and the CLI read and write through the store, never with a
client of their own.

Configuration: store functions take the narrow :class:`~arbstream.store.config.MongoConfig`
and :class:`~arbstream.store.config.InfluxConfig` (``.of(settings)``), never the whole
:class:`~arbstream.config.Settings`, so what is shipped to Spark executors holds no SMTP or
Grafana secret.

Owners:

* MongoDB (:mod:`arbstream.store.mongo`): :mod:`~.mongo.schema` owns every collection's
  name, indexes and TTL; :mod:`~.mongo.client` the connections and bulk upserts; the
  documents of ``opportunities`` :mod:`~.mongo.opportunities`, ``episodes``
  :mod:`~.mongo.episodes`, ``features`` :mod:`~.mongo.features`, ``thresholds``
  :mod:`~.mongo.thresholds`, ``alerts`` and ``alert_claims`` :mod:`~.mongo.alert_log`,
  ``ml_eval`` :mod:`~.mongo.ml_eval`.
* The model registry (:mod:`arbstream.store.models`): the model files under
  ``ARB_MODELS_DIR``, the champion pointers and the MongoDB ``models`` mirror.
* InfluxDB (:mod:`arbstream.store.influx`): :mod:`~.influx.schema` owns the database,
  retention policies and measurement names; :mod:`~.influx.lines` the point and line protocol
  of each measurement; :mod:`~.influx.client` HTTP, retries and errors;
  :mod:`~.influx.writer` writes (batches, rejects, one writer per measurement);
  :mod:`~.influx.queries` reads.
"""
