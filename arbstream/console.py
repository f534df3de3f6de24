"""Terminal output shared by the command lines (``arbstream`` and ``alerts``): the rich
consoles and loading the configuration with a readable error."""

from __future__ import annotations

import sys
from datetime import datetime

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from arbstream.config import Settings, get_settings
from arbstream.timestamps import parse_time

#: Standard output; 160 columns when not a terminal, so piped tables do not wrap at 80.
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)


def settings_or_exit() -> Settings:
    """The validated configuration (:func:`arbstream.config.get_settings`).

    Raises:
        typer.Exit: code 2, after printing why the configuration is invalid.
    """
    try:
        return get_settings()
    except (ValidationError, ValueError, FileNotFoundError) as exc:
        err.print("[red]invalid configuration:[/red]\n" + escape(str(exc)))
        raise typer.Exit(2) from None


def fail(exc: Exception) -> typer.Exit:
    """Print ``exc`` as an error; return the ``typer.Exit`` (code 1) to raise."""
    err.print("[red]error:[/red] " + escape(str(exc)))
    return typer.Exit(1)


def time_option(value: str | None) -> datetime | None:
    """An ISO-8601 option value as an aware UTC datetime (naive means UTC); None stays None.

    Raises:
        typer.BadParameter: the text is not ISO-8601 (exit code 2).
    """
    if value is None:
        return None
    try:
        return parse_time(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
