"""Tests of the store layer (arbstream/store/)."""
