"""How hsae's process shares the CPU (hsae.runtime): passive OpenMP waiting set before torch starts,
threads from the CPUs the process may use, and the user's own settings left alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from hsae.errors import HsaeError
from hsae.runtime import configure_threads, usable_cpus


def _fresh(code: str, **env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    return subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_importing_hsae_sets_passive_waiting_before_torch_unless_the_user_chose():
    code = "import os, hsae, torch; print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in dir())"
    assert _fresh(code) == "PASSIVE True"
    assert _fresh(code, OMP_WAIT_POLICY="ACTIVE") == "ACTIVE True"
    assert _fresh(code, GOMP_SPINCOUNT="10000").startswith("None")


def test_threads_follow_the_usable_cpus_or_the_users_choice(monkeypatch):
    assert 1 <= usable_cpus() <= (os.cpu_count() or 1)
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("HSAE_THREADS", "1")
        assert configure_threads() == 1
        monkeypatch.setenv("HSAE_THREADS", "two")
        with pytest.raises(HsaeError, match="HSAE_THREADS"):
            configure_threads()
        monkeypatch.delenv("HSAE_THREADS")
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        import hsae.runtime as runtime

        # a quiet machine (the busy case is the next test): other jobs running now must not matter here
        monkeypatch.setattr(runtime, "other_runnable_processes", lambda: 0)
        torch.set_num_threads(usable_cpus() + 3)
        assert configure_threads() == usable_cpus()
    finally:
        torch.set_num_threads(before)


def test_threads_leave_out_the_cpus_other_runnable_processes_occupy(monkeypatch):
    import hsae.runtime as runtime

    assert runtime.other_runnable_processes() >= 0
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 4)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(runtime, "other_runnable_processes", lambda: 3)
    assert runtime.idle_cpus() == 1
    monkeypatch.setattr(runtime, "other_runnable_processes", lambda: 9)
    assert runtime.idle_cpus() == 1  # never none
    monkeypatch.setattr(runtime, "other_runnable_processes", lambda: 1)
    assert runtime.idle_cpus() == 3
    # Inside a CPU set the machine-wide run queue says nothing about this process's share.
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(runtime, "other_runnable_processes", lambda: 40)
    assert runtime.idle_cpus() == 4


def test_a_busy_machine_starts_hsae_on_fewer_threads():
    import time

    from hsae.runtime import usable_cpus

    if usable_cpus() < 2 or usable_cpus() < (os.cpu_count() or 1):
        pytest.skip("needs a machine of 2+ CPUs that this process may all use")
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(usable_cpus())]
    try:
        time.sleep(0.3)
        threads = int(_fresh("import hsae, torch; print(torch.get_num_threads())"))
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    assert threads < usable_cpus()
