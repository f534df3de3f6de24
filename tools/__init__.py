"""Developer tools run from the repository root (``python tools/<name>.py``)."""
