"""Tests of the stream job (spark_jobs/)."""
