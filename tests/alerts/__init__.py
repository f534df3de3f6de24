"""Tests of the alert worker (alerts/)."""
