"""Spark Structured Streaming jobs: Kafka source, spread transforms, sinks."""
