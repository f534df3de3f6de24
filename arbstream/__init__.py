"""arbstream: real-time cross-exchange crypto arbitrage on Kafka and Spark."""

__version__ = "0.1.0"
