"""Stopping what clipforge starts: a process that has ended counts as ended even before anyone reaps it (its parent
busy, or gone and the process adopted by a PID 1 that never reaps, as in some CI containers)."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from infra.processes import pid_alive, running_in_group, still_running

# a parent that starts a child which exits at once, and never reaps it: the child stays a zombie while the parent lives
UNREAPED = "import subprocess, sys, time; print(subprocess.Popen(['true']).pid, flush=True); time.sleep(60)"


def test_an_unreaped_process_has_ended_and_a_sleeping_one_runs() -> None:
    parent = subprocess.Popen([sys.executable, "-c", UNREAPED], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)  # the child joins its process group
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        deadline = time.monotonic() + 10
        while child.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert not pid_alive(child.pid)
        assert pid_alive(parent.pid)
        assert still_running([child, psutil.Process(parent.pid)]) == [psutil.Process(parent.pid)]
        assert still_running([child], timeout=30) == []
        assert running_in_group(parent.pid) == [psutil.Process(parent.pid)]
    finally:
        parent.kill()
        parent.wait()
    assert not pid_alive(parent.pid)
    assert running_in_group(parent.pid) == []
