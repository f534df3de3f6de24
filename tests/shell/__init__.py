"""Tests of the CLI shell (arbstream/shell/) and deployment files."""
