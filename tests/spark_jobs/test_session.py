"""The job's SparkSession as a host sees it: the web UI on loopback only, no kill links.

Runs a session in a child process (the test session's own Spark is already up, UI off)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from arbstream.shell.stack import ensure_java

pytestmark = pytest.mark.e2e

CHILD = """
import json, os, urllib.request
from arbstream.config import Settings
from spark_jobs.session import build_session
os.environ.pop("SPARK_LOCAL_IP", None)
spark = build_session(Settings(), app_name="ui-check", ui=True)
url = spark.sparkContext.uiWebUrl
conf = dict(spark.sparkContext.getConf().getAll())
print(json.dumps({"url": url, "kill": conf.get("spark.ui.killEnabled")}))
spark.stop()
"""


def _outward_ip() -> str | None:
    """An address of this machine other than loopback, if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: no packet is sent for UDP connect
            ip = probe.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_local_job_ui_on_loopback_only_without_kill_links() -> None:
    """While a local job runs, its UI answers on 127.0.0.1 and not on the machine's outward
    address, and its kill links are off."""
    ensure_java()
    child = CHILD.replace("spark.stop()", "import sys; sys.stdout.flush(); input(); spark.stop()")
    proc = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        line = ""
        while not line.startswith("{"):
            line = proc.stdout.readline()
            assert line, "the child session ended early"
        found = json.loads(line)
        assert found["kill"] == "false"
        assert found["url"].split(":")[1] in ("//127.0.0.1", "//localhost"), found
        port = int(found["url"].rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        outward = _outward_ip()
        if outward is not None:
            with pytest.raises(OSError), socket.create_connection((outward, port), timeout=5):
                pass
    finally:
        proc.communicate("\n", timeout=120)
