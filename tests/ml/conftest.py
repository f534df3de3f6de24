"""Fixtures of the retraining tests. The real two-day lake they use, ``iaqf_lake`` (IAQF bars
of 2023-03-09 and 2023-03-10, one day before and one during the USDC depeg, written by the
stream's own backfill with 60 s windows, built once per test run and shared by the
pytest-xdist workers), is a session fixture of ``tests/conftest.py``, shared with
``tests/notebooks``."""
