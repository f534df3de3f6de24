"""Spark schemas of wire records, derived from their pydantic models (no pyspark needed).

The stream job parses trades and producers' health records with Spark's ``from_json``; the
schema it uses is :func:`spark_ddl` of the record's model (:mod:`arbstream.schemas`), so a
field added to a model reaches the stream's schema. Plain DDL text, so producers and the alert
worker import :mod:`arbstream.schemas` without Spark.

Types: ``int`` is ``BIGINT`` (epoch milliseconds and counters need 64 bits), a ``Literal`` of
ints (an enumerated code such as ``schema_version``) ``INT``, ``float`` ``DOUBLE``, ``str`` and
a ``Literal`` of strings ``STRING``, ``bool`` ``BOOLEAN``; ``X | None`` is ``X``'s type. Any
other annotation raises ``TypeError``: add its mapping here rather than guess. Every column
is nullable: ``from_json`` must also parse a record that lacks a field or has the wrong type,
which the stream then dead-letters with the reason (:mod:`spark_jobs.transforms`).
"""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel

_SPARK_TYPES = {bool: "BOOLEAN", int: "BIGINT", float: "DOUBLE", str: "STRING"}


def spark_type(annotation: Any) -> str:
    """Spark SQL type of one field's annotation (module docstring, "Types").

    Raises:
        TypeError: no mapping for ``annotation``, or a union of several Spark types.
    """
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        kinds = {spark_type(a) for a in get_args(annotation) if a is not type(None)}
        if len(kinds) == 1:
            return kinds.pop()
    elif origin is Literal:
        kinds = {type(v) for v in get_args(annotation)}
        if kinds == {int}:
            return "INT"
        if len(kinds) == 1:
            return spark_type(kinds.pop())
    elif annotation in _SPARK_TYPES:
        return _SPARK_TYPES[annotation]
    raise TypeError(f"no Spark type for {annotation!r}")


def spark_columns(model: type[BaseModel]) -> list[tuple[str, str]]:
    """``(name, Spark SQL type)`` of each field of ``model`` in field order, which is the key
    order of its ``model_dump_json``.

    Raises:
        TypeError: a field whose annotation has no Spark type, naming the field.
    """
    out = []
    for name, field in model.model_fields.items():
        try:
            out.append((name, spark_type(field.annotation)))
        except TypeError as exc:
            raise TypeError(f"{model.__name__}.{name}: {exc}") from None
    return out


def spark_ddl(model: type[BaseModel]) -> str:
    """Spark DDL ``name TYPE, ...`` of ``model`` (:func:`spark_columns`), every column
    nullable: the schema ``from_json`` parses its JSON with."""
    return ", ".join(f"{name} {kind}" for name, kind in spark_columns(model))
