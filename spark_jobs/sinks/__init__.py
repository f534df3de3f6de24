"""Idempotent sinks used from foreachBatch: MongoDB, InfluxDB, Kafka."""
