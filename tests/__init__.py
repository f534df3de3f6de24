"""arbstream's tests: one folder per package, fixtures in per-folder ``conftest.py``."""
