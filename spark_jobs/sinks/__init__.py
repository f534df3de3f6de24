"""The stream's Spark-side sink glue, written from ``foreachBatch``: :mod:`.records` turns the
market query's Arrow partitions into writes through the store (MongoDB and InfluxDB,
:mod:`arbstream.store`, both idempotent) and produces the Kafka events and dead letters. The
collections, measurements, writes and queries themselves belong to :mod:`arbstream.store`."""
