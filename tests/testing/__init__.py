"""Tests of the test infrastructure (testing/)."""
