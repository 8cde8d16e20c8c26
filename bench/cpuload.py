"""How much of the machine other work took while a stretch of a job ran (torch-free).

A job's wall times are costs only if nothing else competed for its cores: two 2-thread torch jobs
on a 2-core machine run each other several-fold slower (``_warn_if_busy`` in ``bench.run``), and
a record that only says ``threads: 2`` cannot tell such a run from one alone. So every job measures,
for the whole job and for each probe, the CPU time the rest of the machine used meanwhile:

    others_cpus = (machine busy CPU-seconds − this process's CPU-seconds) / wall seconds

— on average how many CPUs other processes kept busy (0 alone; about 1 beside a one-thread job).
The machine's busy time is the aggregate ``cpu`` line of ``/proc/stat`` (user + nice + system +
irq + softirq + steal; idle and iowait are not busy), this process's is ``time.process_time``
(every thread of it). Where there is no ``/proc/stat`` (macOS, Windows) the numbers are ``None``.

``busy`` (through ``record_busy``, used by ``scripts/bench_probes.py`` to leave contended timings out) calls a stretch
contended when others took more than a tenth of a CPU on average (``OTHERS_TOLERANCE``) *and* left fewer than
``threads + 1`` CPUs free: a 16-core node running someone's 2-thread job beside ours is not
short of cores, a 2-core machine running two jobs is. Measured on the 2-core machine of the README's timings:
a 40 s torch loop alone read 0.009; a quick job with a one-core spin loop beside it for 60 s of its 154 s
partial-diffusion stage read 0.27 for that stage (the spin got about two thirds of a core) and 0.16 for the job.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

STAT = Path("/proc/stat")
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system [idle iowait] irq softirq steal; guest is inside user
OTHERS_TOLERANCE = 0.1  # CPUs of other work on average that still count as "alone": a job alone here reads 0.01


def _machine() -> tuple[float, int] | None:
    """(busy CPU-seconds since boot, CPUs) of the whole machine, or None without ``/proc/stat``."""
    try:
        lines = STAT.read_text().splitlines()
    except OSError:
        return None
    fields = [int(x) for x in lines[0].split()[1:]]
    cpus = sum(1 for line in lines[1:] if line.startswith("cpu") and line[3:4].isdigit())
    return sum(fields[i] for i in _BUSY_FIELDS if i < len(fields)) / os.sysconf("SC_CLK_TCK"), cpus


class OtherLoad:
    """Started at construction; ``stop()`` gives ``{"others_cpus", "cpus"}`` for the stretch since."""

    def __init__(self) -> None:
        self._wall, self._own, self._machine = time.monotonic(), time.process_time(), _machine()

    def stop(self) -> dict[str, float | int | None]:
        now = _machine()
        wall = time.monotonic() - self._wall
        if self._machine is None or now is None or wall <= 0:
            return {"others_cpus": None, "cpus": None}
        others = (now[0] - self._machine[0]) - (time.process_time() - self._own)
        # the two clocks tick differently (jiffies against nanoseconds): a job alone can read a hair below 0
        return {"others_cpus": round(max(0.0, others / wall), 3), "cpus": now[1]}


def busy(load: dict | None, threads: int | None) -> bool | None:
    """Whether a measured stretch ran short of cores (see the module doc); None if it was not measured."""
    if not load or load.get("others_cpus") is None or not load.get("cpus"):
        return None
    others = float(load["others_cpus"])
    return others > OTHERS_TOLERANCE and load["cpus"] - others < (threads or 1) + 1


def record_busy(record: dict, probe: str | None = None) -> bool | None:
    """``busy`` for a record's whole job (``probe=None``, ``cost``) or one probe (``cost.probes.<probe>``),
    at the torch threads the record ran with."""
    cost = record.get("cost") or {}
    return busy(cost if probe is None else (cost.get("probes") or {}).get(probe), (record.get("env") or {}).get("threads"))
