"""Publishing the dashboards (and optionally the datasource) to a running Grafana over its
HTTP API with ``grafana-client`` (:func:`publish`)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import SecretStr

from arbstream.config import Settings
from grafana.dashboards import DATASOURCE_UID, GrafanaError, load_dashboards


@dataclass(frozen=True)
class GrafanaConfig:
    """The Grafana slice of :class:`~arbstream.config.Settings` (``ARB_GRAFANA_*``) plus the
    InfluxDB datasource Grafana should use. Secrets stay :class:`~pydantic.SecretStr`, so the
    object can be logged."""

    url: str
    folder: str
    token: SecretStr | None = None
    username: str | None = None
    password: SecretStr | None = None
    influx_url: str = "http://127.0.0.1:8086"
    influx_db: str = "arbstream"
    influx_username: str | None = None
    influx_password: SecretStr | None = None

    @classmethod
    def of(cls, settings: Settings) -> GrafanaConfig:
        """The Grafana slice of ``settings``; ``influx_url`` is ``grafana_influx_url`` (the
        InfluxDB URL as the Grafana server reaches it), default ``influx_url``."""
        return cls(
            url=settings.grafana_url.rstrip("/"), folder=settings.grafana_folder,
            token=settings.grafana_token, username=settings.grafana_username,
            password=settings.grafana_password,
            influx_url=settings.grafana_influx_url or settings.influx_url,
            influx_db=settings.influx_db, influx_username=settings.influx_username,
            influx_password=settings.influx_password,
        )


@dataclass
class PublishReport:
    """What :func:`publish` did: the folder uid, each dashboard's uid → URL path and version
    as Grafana answered, and whether the datasource was created or updated."""

    folder_uid: str
    dashboards: dict[str, str] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    datasource: str | None = None


def folder_uid(title: str) -> str:
    """The uid arbstream gives a folder: the lower-case slug of its title (``a-z0-9-``)."""
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    return slug or "arbstream"


def datasource_payload(cfg: GrafanaConfig) -> dict[str, Any]:
    """The InfluxQL datasource for Grafana's ``/api/datasources``, the same as
    ``grafana/provisioning/datasources/influxdb.yaml`` with the configured values:
    URL ``influx_url``, database ``influx_db``, user and password
    ``influx_username``/``influx_password`` (password in ``secureJsonData``)."""
    payload: dict[str, Any] = {
        "uid": DATASOURCE_UID, "name": "arbstream InfluxDB", "type": "influxdb",
        "access": "proxy", "url": cfg.influx_url, "user": cfg.influx_username or "",
        "jsonData": {"version": "InfluxQL", "dbName": cfg.influx_db, "httpMode": "GET",
                     "timeInterval": "1s"},
        "isDefault": False,
    }
    if cfg.influx_password is not None:
        payload["secureJsonData"] = {"password": cfg.influx_password.get_secret_value()}
    return payload


def client(cfg: GrafanaConfig, timeout: float = 10.0) -> Any:
    """A ``grafana_client.GrafanaApi`` for ``cfg.url``, authenticated with the token
    (``Authorization: Bearer``) or else the user and password (basic auth).

    Raises:
        GrafanaError: neither a token nor a user and password is configured.
    """
    from grafana_client import GrafanaApi

    if cfg.token is not None:
        credential: Any = cfg.token.get_secret_value()
    elif cfg.username and cfg.password is not None:
        credential = (cfg.username, cfg.password.get_secret_value())
    else:
        raise GrafanaError("no Grafana credentials: set ARB_GRAFANA_TOKEN, or "
                           "ARB_GRAFANA_USERNAME and ARB_GRAFANA_PASSWORD")
    return GrafanaApi.from_url(cfg.url, credential=credential, timeout=timeout)


def publish(
    settings: Settings | GrafanaConfig,
    dashboards: Mapping[str, Mapping[str, Any]] | None = None,
    *,
    datasource: bool = False,
    timeout: float = 10.0,
) -> PublishReport:
    """Push the dashboards (default: :func:`load_dashboards`) into the folder
    ``grafana_folder`` of the Grafana at ``grafana_url`` (``settings`` is narrowed to its
    :class:`GrafanaConfig` at once), overwriting any
    dashboard with the same uid (``POST /api/dashboards/db``, ``overwrite: true``). The folder
    is created when missing (``GET``/``POST /api/folders``). With ``datasource`` the InfluxDB
    datasource (:func:`datasource_payload`) is updated by uid, or created when missing.

    Returns:
        A :class:`PublishReport`.

    Raises:
        GrafanaError: missing credentials; Grafana answered an HTTP error (4xx/5xx: the status,
            what was being done and Grafana's message are in the text); or it could not be
            reached.
    """
    import requests
    from grafana_client.client import GrafanaClientError, GrafanaException

    cfg = settings if isinstance(settings, GrafanaConfig) else GrafanaConfig.of(settings)
    boards = dict(dashboards) if dashboards is not None else load_dashboards()
    api = client(cfg, timeout)
    base = cfg.url

    def call(what: str, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except GrafanaException as exc:
            raise GrafanaError(f"Grafana at {base} answered HTTP {exc.status_code} to {what}: "
                               f"{_message(exc)}") from None
        except requests.RequestException as exc:
            raise GrafanaError(f"cannot reach Grafana at {base} ({what}): {exc}") from None

    uid = folder_uid(cfg.folder)
    try:
        api.folder.get_folder(uid)
    except GrafanaClientError as exc:
        if exc.status_code != 404:
            raise GrafanaError(f"Grafana at {base} answered HTTP {exc.status_code} to reading "
                               f"folder {uid}: {_message(exc)}") from None
        call(f"creating folder {cfg.folder!r}", api.folder.create_folder, cfg.folder, uid)
    except requests.RequestException as exc:
        raise GrafanaError(f"cannot reach Grafana at {base}: {exc}") from None
    report = PublishReport(folder_uid=uid)
    if datasource:
        payload = datasource_payload(cfg)
        try:
            api.datasource.get_datasource_by_uid(DATASOURCE_UID)
            exists = True
        except GrafanaClientError as exc:
            if exc.status_code != 404:
                raise GrafanaError(f"Grafana at {base} answered HTTP {exc.status_code} to "
                                   f"reading datasource {DATASOURCE_UID}: {_message(exc)}"
                                   ) from None
            exists = False
        if exists:
            call("updating the datasource", api.datasource.update_datasource_by_uid,
                 DATASOURCE_UID, payload)
            report.datasource = "updated"
        else:
            call("creating the datasource", api.datasource.create_datasource, payload)
            report.datasource = "created"
    for board_uid, board in boards.items():
        body = {"dashboard": {**board, "id": None}, "folderUid": uid, "overwrite": True,
                "message": "arbstream grafana publish"}
        answer = call(f"saving dashboard {board_uid}", api.dashboard.update_dashboard, body)
        report.dashboards[board_uid] = str(answer.get("url", f"/d/{board_uid}"))
        if isinstance(answer.get("version"), int):
            report.versions[board_uid] = answer["version"]
    return report


def _message(exc: Any) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and response.get("message"):
        return str(response["message"])
    return str(response or exc)


