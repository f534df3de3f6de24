"""Tests of the Grafana dashboards (grafana/)."""
