"""How hsae's process shares the CPU: OpenMP threads that wait passively, and no more of them than
the CPUs this process may use and other processes leave idle.

On a loaded machine OpenMP's default spin-waiting makes every parallel region wait for threads that
the OS has descheduled: a tiny SAE that trains at 141k tokens/s alone dropped to 2.4k among four
busy processes, and to 34.6k with passive waiting (issue 18). The wait policy must be set before the
OpenMP runtime starts, so `prefer_passive_waiting` runs when `hsae` is imported, before torch; the
thread count is applied once torch is loaded. Passive waiting alone still leaves a team of threads
that waits at every barrier for a member the OS has descheduled, so the count also leaves out the
CPUs other runnable processes occupy when hsae starts (measured in benchmarks/loaded_machine.py).
Users override both: OMP_WAIT_POLICY (or GOMP_SPINCOUNT) and OMP_NUM_THREADS / HSAE_THREADS are
never overwritten.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def prefer_passive_waiting() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the user chose a policy (call before torch is imported)."""
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (containers)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def other_runnable_processes(samples: int = 3, interval_s: float = 0.005) -> int:
    """Processes other than this one that are running or ready to run, machine-wide (the kernel's
    run queue in /proc/loadavg; the least of a few samples, so a brief spike does not count); 0
    where it cannot be read."""
    counts = []
    for i in range(samples):
        try:
            running = Path("/proc/loadavg").read_text().split()[3].split("/")[0]
            counts.append(int(running) - 1)  # the reading process is running
        except (OSError, IndexError, ValueError):
            return 0
        if i + 1 < samples:
            time.sleep(interval_s)
    return max(0, min(counts))


def idle_cpus() -> int:
    """The usable CPUs less those other runnable processes occupy (at least 1). Only where this
    process may use every CPU of the machine: inside a CPU set or quota the machine-wide run queue
    says nothing about this process's share."""
    usable = usable_cpus()
    if usable < (os.cpu_count() or 1):
        return usable
    return max(1, usable - other_runnable_processes())


def configure_threads() -> int:
    """Set torch's intra-op threads: HSAE_THREADS if given, else (unless OMP_NUM_THREADS says) the
    idle CPUs. Returns the count in use."""
    import torch

    wanted = os.environ.get("HSAE_THREADS")
    if wanted:
        try:
            torch.set_num_threads(max(1, int(wanted)))
        except ValueError:
            from hsae.errors import HsaeError

            raise HsaeError(f"HSAE_THREADS must be a whole number of threads, got {wanted!r}") from None
    elif "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > (idle := idle_cpus()):
        torch.set_num_threads(idle)
    return torch.get_num_threads()
