"""The stream's sinks, written from ``foreachBatch``: MongoDB (:mod:`.mongo`) and InfluxDB
(:mod:`.influx`), both idempotent, and the records writer that also produces Kafka events and
dead letters (:mod:`.records`)."""
