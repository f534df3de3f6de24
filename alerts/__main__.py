"""``python -m alerts``: the alerts command line (same as ``arbstream alerts``)."""

from alerts.cli import app

app(prog_name="alerts")
