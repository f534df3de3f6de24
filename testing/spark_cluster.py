"""A Spark standalone cluster on this machine, from the pyspark distribution's own
``spark-class``: one master and ``workers`` workers, each a JVM process on free loopback ports
(RPC and web UIs bound to 127.0.0.1). Jobs reach it with ``--master spark://127.0.0.1:<port>``,
exactly the command a real cluster takes (the executors run in the workers' JVMs, not in the
driver's).

:func:`executor_python` makes what a real cluster's nodes have: a Python with arbstream's
third-party dependencies but not arbstream itself (this checkout's editable install is
invisible to it), so a job's code can only come from what ``spark-submit --py-files`` ships.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyspark

from arbstream.shell.stack import ensure_java, free_port

SPARK_HOME = Path(pyspark.__file__).parent


def get_json(url: str, timeout: float = 30.0) -> Any:
    """GET ``url`` and parse its JSON body.

    Raises:
        OSError: the server cannot be reached (``urllib.error.URLError`` included).
    """
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return json.load(reply)


@dataclass(frozen=True)
class Cluster:
    """A running standalone cluster: the master's ``url`` (``spark://127.0.0.1:<port>``), its
    web UI (``webui``, ``http://``), the workers' web UIs and work directories (an executor
    of application ``A`` runs in ``<work_dir>/A/<executor id>/``, with its ``stdout``,
    ``stderr`` and the files the job shipped)."""

    url: str
    webui: str
    worker_uis: tuple[str, ...]
    work_dirs: tuple[Path, ...]

    def master_state(self) -> dict[str, Any]:
        """The master's ``/json/`` (``aliveworkers``, ``workers``, ``activeapps``,
        ``completedapps``)."""
        return get_json(f"{self.webui}/json/")

    def worker_states(self) -> list[dict[str, Any]]:
        """Each worker's ``/json/`` (``id``, ``executors``, ``finishedexecutors``, each with
        ``appid`` and ``id``)."""
        return [get_json(f"{ui}/json/") for ui in self.worker_uis]


def _alive_workers(webui: str) -> int:
    try:
        return int(get_json(f"{webui}/json/", timeout=2).get("aliveworkers", 0))
    except OSError:
        return 0


@contextmanager
def spark_cluster(work: Path, workers: int = 1, cores: int = 1, memory: str = "2g",
                  timeout: float = 180.0) -> Iterator[Cluster]:
    """Start a master and ``workers`` workers (each ``cores`` cores, ``memory``), logs under
    ``work``; yield the :class:`Cluster` once every worker has registered; stop them all.

    Worker ``i``'s work directory is ``work/work`` for the first, ``work/work-<i>`` for the
    others. The daemons get this environment without any ``ARB_*`` variable: executors see
    only what the job ships to them, as on a real cluster.

    Raises:
        ValueError: ``workers`` < 1.
        RuntimeError: the workers did not register within ``timeout`` s (the logs' tails).
    """
    if workers < 1:
        raise ValueError(f"a cluster needs at least one worker, got {workers}")
    ensure_java()
    work.mkdir(parents=True, exist_ok=True)
    port, ui = free_port(), free_port()
    url, webui = f"spark://127.0.0.1:{port}", f"http://127.0.0.1:{ui}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARB_")}
    env |= {"SPARK_HOME": str(SPARK_HOME), "PYSPARK_PYTHON": sys.executable,
            "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_LOG_DIR": str(work)}
    cls = str(SPARK_HOME / "bin" / "spark-class")
    names = ["master", *(f"worker-{i}" for i in range(workers))]
    logs = {name: (work / f"{name}.log").open("w") for name in names}
    worker_uis = [free_port() for _ in range(workers)]
    work_dirs = [work / ("work" if i == 0 else f"work-{i}") for i in range(workers)]
    procs = [subprocess.Popen(
        [cls, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1", "--port",
         str(port), "--webui-port", str(ui)],
        env=env, stdout=logs["master"], stderr=subprocess.STDOUT)]
    try:
        for i in range(workers):
            procs.append(subprocess.Popen(
                [cls, "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                 "--cores", str(cores), "--memory", memory, "--webui-port",
                 str(worker_uis[i]), "--work-dir", str(work_dirs[i]), url],
                env=env, stdout=logs[f"worker-{i}"], stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        while _alive_workers(webui) < workers:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                tails = {n: (work / f"{n}.log").read_text()[-1500:] for n in names}
                raise RuntimeError(f"standalone cluster did not start: {tails}")
            time.sleep(0.5)
        yield Cluster(url, webui, tuple(f"http://127.0.0.1:{p}" for p in worker_uis),
                      tuple(work_dirs))
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


@contextmanager
def standalone_cluster(work: Path, cores: int = 2, memory: str = "2g",
                       timeout: float = 180.0, workers: int = 1) -> Iterator[str]:
    """:func:`spark_cluster` yielding only the master URL (one worker of ``cores`` cores by
    default).

    Raises:
        RuntimeError: the workers did not register within ``timeout`` s.
    """
    with spark_cluster(work, workers, cores, memory, timeout) as cluster:
        yield cluster.url


def executor_python(root: Path) -> Path:
    """A Python interpreter with this environment's third-party packages but without
    arbstream: a virtual environment at ``root`` (made once) whose only ``.pth`` file puts
    this interpreter's ``site-packages`` on ``sys.path``. A directory named in a ``.pth`` file
    is added as it is, its own ``.pth`` files are not run, so the editable install's import
    hook (``__editable__.arbstream-*.pth``) never loads: ``import arbstream`` fails unless
    the code is shipped (``--py-files``). Returns the interpreter's path.

    Raises:
        subprocess.CalledProcessError: the virtual environment cannot be made.
    """
    python = root / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
        purelib = Path(subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True).stdout.strip())
        dirs = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
        (purelib / "arbstream-deps.pth").write_text("".join(f"{d}\n" for d in dirs))
    return python
