"""A Spark standalone cluster on this machine, from the pyspark distribution's own
``spark-class``: one master and one worker, each a JVM process, on free ports. Jobs reach it
with ``--master spark://127.0.0.1:<port>``, exactly the command a real cluster takes (the
executors run in the worker's JVMs, not in the driver's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyspark

from arbstream.shell.stack import ensure_java, free_port

SPARK_HOME = Path(pyspark.__file__).parent


def _alive_workers(webui: str) -> int:
    try:
        with urllib.request.urlopen(f"{webui}/json/", timeout=2) as reply:
            return int(json.load(reply).get("aliveworkers", 0))
    except OSError:
        return 0


@contextmanager
def standalone_cluster(work: Path, cores: int = 2, memory: str = "2g",
                       timeout: float = 180.0) -> Iterator[str]:
    """Start a master and one worker (``cores``, ``memory``) with logs and scratch under
    ``work``; yield the master URL once the worker has registered; stop both.

    Raises:
        RuntimeError: the worker did not register within ``timeout`` s (the logs' tails).
    """
    ensure_java()
    work.mkdir(parents=True, exist_ok=True)
    port, ui, worker_ui = free_port(), free_port(), free_port()
    url = f"spark://127.0.0.1:{port}"
    env = {**os.environ, "SPARK_HOME": str(SPARK_HOME), "PYSPARK_PYTHON": sys.executable,
           "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_LOG_DIR": str(work)}
    cls = str(SPARK_HOME / "bin" / "spark-class")
    logs = {name: (work / f"{name}.log").open("w") for name in ("master", "worker")}
    procs = [
        subprocess.Popen([cls, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                          "--port", str(port), "--webui-port", str(ui)], env=env,
                         stdout=logs["master"], stderr=subprocess.STDOUT),
        subprocess.Popen([cls, "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                          "--cores", str(cores), "--memory", memory, "--webui-port",
                          str(worker_ui), "--work-dir", str(work / "work"), url], env=env,
                         stdout=logs["worker"], stderr=subprocess.STDOUT),
    ]
    try:
        deadline = time.monotonic() + timeout
        while _alive_workers(f"http://127.0.0.1:{ui}") < 1:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                tails = {n: (work / f"{n}.log").read_text()[-1500:] for n in logs}
                raise RuntimeError(f"standalone cluster did not start: {tails}")
            time.sleep(0.5)
        yield url
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        for handle in logs.values():
            handle.close()
