"""The CLI shell: ``arbstream``'s command line (:mod:`arbstream.shell.cli`) mounting each
component's Typer sub-app, plus what only a developer's machine needs: the local stack of real
services run as processes (:mod:`arbstream.shell.stack`), the demo
(:mod:`arbstream.shell.demo`) and its detection-latency reading (:mod:`arbstream.shell.latency`).

The shell is the top layer: it may import every component; no component, store or core module
imports it (``tests/tools/test_layers.py``).
"""
