"""Terminal output shared by the command lines (``arbstream`` and ``alerts``): the rich
consoles and loading the configuration with a readable error."""

from __future__ import annotations

import sys
from datetime import datetime

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape

from arbstream.config import Settings, expected_format, get_settings, unknown_env_vars
from arbstream.timestamps import parse_time

#: Standard output; 160 columns when not a terminal, so piped tables do not wrap at 80.
console = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True)


def settings_or_exit() -> Settings:
    """The validated configuration (:func:`arbstream.config.get_settings`).

    Raises:
        typer.Exit: code 2, after printing why the configuration is invalid.
    """
    for name, close in unknown_env_vars():
        hint = f" (did you mean {close}?)" if close else ""
        err.print(f"[yellow]warning:[/yellow] {name} is not an arbstream setting and is "
                  f"ignored{hint}; the settings are listed in .env.example")
    try:
        return get_settings()
    except (ValidationError, ValueError, FileNotFoundError) as exc:
        hints = [h for h in (expected_format(f) for f in _fields_in(str(exc))) if h]
        err.print("[red]invalid configuration:[/red]\n" + escape(str(exc))
                  + "".join(f"\n{escape(h)}" for h in hints))
        raise typer.Exit(2) from None


def _fields_in(message: str) -> list[str]:
    """Setting names a pydantic or pydantic-settings error message mentions."""
    import re

    names = re.findall(r'field "(\w+)"', message) + re.findall(r"^(\w+)\n", message, re.M)
    return [n for n in dict.fromkeys(names) if n in Settings.model_fields]


def fail(exc: Exception) -> typer.Exit:
    """Print ``exc`` as an error (not wrapped: one line stays one line in a log); return
    the ``typer.Exit`` (code 1) to raise."""
    err.print("[red]error:[/red] " + escape(str(exc)), soft_wrap=True)
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
