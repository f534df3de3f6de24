"""Grafana: the provisioned dashboards (package data under ``provisioning/``), how Grafana
expands their InfluxQL, checking them against InfluxDB, and publishing them.

* :mod:`grafana.dashboards`: the files, loading them, :func:`lint`;
* :mod:`grafana.influxql`: :func:`render_query` and :func:`check`, as Grafana 11 expands a
  panel query;
* :mod:`grafana.publishing`: :func:`publish` over Grafana's HTTP API (``grafana-client``);
* :mod:`grafana.cli`: the ``arbstream grafana`` sub-app.

The names below are this package's public API.
"""

from grafana.dashboards import (
    ALIAS_PATTERNS,
    BUILTINS,
    DASHBOARD_DIR,
    DASHBOARD_UIDS,
    DATASOURCE_FILE,
    DATASOURCE_UID,
    PROVIDER_FILE,
    PROVISIONING,
    VARIABLE_RE,
    GrafanaError,
    iter_panels,
    lint,
    load_dashboards,
    referenced_variables,
    variables,
)
from grafana.influxql import (
    PanelQuery,
    PanelResult,
    TimeRange,
    check,
    current_values,
    dashboard_queries,
    duration_ms,
    escape_regex,
    format_interval,
    format_value,
    interpolate,
    panel_interval,
    panel_range,
    render_query,
    round_interval,
    variable_query,
)
from grafana.publishing import (
    GrafanaConfig,
    PublishReport,
    client,
    datasource_payload,
    folder_uid,
    publish,
)

__all__ = [
    "ALIAS_PATTERNS", "BUILTINS", "DASHBOARD_DIR", "DASHBOARD_UIDS", "DATASOURCE_FILE",
    "DATASOURCE_UID", "PROVIDER_FILE", "PROVISIONING", "VARIABLE_RE", "GrafanaConfig",
    "GrafanaError", "PanelQuery", "PanelResult", "PublishReport", "TimeRange", "check",
    "client", "current_values", "dashboard_queries", "datasource_payload", "duration_ms",
    "escape_regex", "folder_uid", "format_interval", "format_value", "interpolate",
    "iter_panels", "lint", "load_dashboards", "panel_interval", "panel_range", "publish",
    "referenced_variables", "render_query", "round_interval", "variable_query", "variables",
]
