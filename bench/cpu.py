"""CPU time of this process and its descendants, by kind of process, from ``/proc`` (Linux):
on a shared machine per-process CPU seconds are steadier than wall-clock ratios.

Own CPU = ``utime + stime`` of ``/proc/<pid>/stat`` (fields 14 and 15, clock ticks), summed by
the kind matched from the command line (:data:`KINDS`, first match wins)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")
#: Process kinds by command line, first match wins: CPU time is summed per kind.
KINDS = (
    ("arbstream backfill", "backfill"), ("publisher_proc", "publisher"), ("tansu", "broker"),
    ("influxd", "influxd"),
    ("secantusd", "mongo"), ("python_streaming_source_runner", "py source planner"),
    ("pyspark.daemon", "py workers"), ("pyspark.worker", "py workers"), ("java", "spark jvm"),
    ("retrain.py", "py driver (retrain.py)"),
)


def _tree(root: int, root_kind: str = "driver") -> dict[tuple[int, int], tuple[str, float]]:
    """(pid, start time) -> (kind, own CPU seconds) of ``root`` (kind ``root_kind``) and all
    its descendants."""
    procs: dict[int, tuple[int, int, float, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()
        cpu = (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime
        procs[int(entry)] = (int(fields[1]), int(fields[19]), cpu, cmd)
    out: dict[tuple[int, int], tuple[str, float]] = {}
    for pid, (_, started, cpu, cmd) in procs.items():
        ancestor = pid
        while ancestor not in (root, 0, 1) and ancestor in procs:
            ancestor = procs[ancestor][0]
        if ancestor == root:
            kind = root_kind if pid == root else next(
                (k for needle, k in KINDS if needle in cmd), "other")
            out[(pid, started)] = (kind, cpu)
    return out


class CpuSampler(threading.Thread):
    """Samples the own CPU time of this process and its descendants every ``interval`` s;
    ``delta()`` is the CPU seconds used per kind of process since the sampler started. A
    process that exits is counted up to its last sample (at most ``interval`` s of it is
    missed)."""

    def __init__(self, interval: float = 0.5, root_kind: str = "driver") -> None:
        super().__init__(daemon=True)
        self.interval = interval
        self.root_kind = root_kind  # this process: the Spark driver of the stream bench
        self.first = _tree(os.getpid(), root_kind)
        self.last = dict(self.first)
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.last.update(_tree(os.getpid(), self.root_kind))

    def delta(self) -> dict[str, float]:
        """Stop sampling; CPU seconds per kind since the start."""
        self.stop_event.set()
        self.last.update(_tree(os.getpid(), self.root_kind))
        out: dict[str, float] = {}
        for key, (kind, cpu) in self.last.items():
            used = cpu - self.first.get(key, (kind, 0.0))[1]
            out[kind] = out.get(kind, 0.0) + used
        return dict(sorted(out.items()))
