"""InfluxDB: every measurement of arbstream, written and read in one place.

:mod:`.schema` (database, retention policies, measurement names), :mod:`.lines` (the point
and line protocol of each measurement), :mod:`.client` (HTTP, retries, errors),
:mod:`.writer` (batched writes, refused lines, one writer per measurement) and
:mod:`.queries` (InfluxQL reads). Every function takes an
:class:`~arbstream.store.config.InfluxConfig`; times are UTC, ms unless noted.
"""
