"""Tests of core (arbstream/)."""
