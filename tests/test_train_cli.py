"""`clipforge train` as a person runs it, on a local Ray it starts itself: quiet output, a progress bar that updates in
place on a terminal, and Ctrl-C that stops everything the command started and can be resumed.

All slow: each test starts a real local Ray (`ray start --head`) through the CLI.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from infra.processes import still_running
from tests.shards import write_dataset

pytestmark = pytest.mark.slow

CLIPFORGE = str(Path(sys.executable).with_name("clipforge"))


def train_command(data: Path, output: Path, steps: int) -> list[str]:
    # the data as a relative path, as a person types it: the Ray workers, which run elsewhere, still find it
    return [CLIPFORGE, "train", "--data", os.path.relpath(data), "--output", str(output), "--preset", "tiny",
            "--batch-size", "32", "--steps", str(steps), "--checkpoint-every", "4"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("shards") / "data", [64] * 4)


def resumable(run: Path) -> bool:
    """Ray's record of the run's checkpoints, what a re-run resumes from, names one (a checkpoint on storage is
    registered there a moment after it is written)."""
    for snapshot in run.glob("ray/*/checkpoint_manager_snapshot.json"):
        with contextlib.suppress(ValueError):  # being rewritten
            if json.loads(snapshot.read_text())["checkpoint_results"]:
                return True
    return False


def _default_ctrl_c() -> None:
    """A shell gives its foreground job the default Ctrl-C, also where the tests run with SIGINT ignored (as a
    background job of a non-interactive shell does: `make test &` in a script)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Terminal:
    """A command on a pseudo-terminal, in a session of its own, as a shell runs it: its output collected."""

    def __init__(self, command: list[str]):
        master, slave = pty.openpty()
        self.process = subprocess.Popen(command, stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
                                        close_fds=True, preexec_fn=_default_ctrl_c)
        os.close(slave)
        self.output = bytearray()
        self.seen: dict[int, psutil.Process] = {}  # every process the command started, as they appear
        self._reader = threading.Thread(target=self._read, args=(master,), daemon=True)
        self._reader.start()

    def _read(self, master: int) -> None:
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                return
            if not chunk:
                return
            self.output += chunk

    def record_descendants(self) -> None:
        try:
            for child in psutil.Process(self.process.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass

    def wait_for(self, text: bytes, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert self.process.poll() is None, f"exited early:\n{self.text()}"
            assert time.monotonic() < deadline, f"{text!r} not seen in {timeout} s:\n{self.text()}"
            self.record_descendants()
            time.sleep(0.5)

    def text(self) -> str:
        return self.output.decode(errors="replace")[-4000:]


def test_ctrl_c_stops_everything_and_the_same_command_resumes_with_quiet_output(data: Path, tmp_path: Path) -> None:
    command = train_command(data, tmp_path / "run", steps=120)  # Ctrl-C lands mid-training
    terminal = Terminal(command)
    try:
        terminal.wait_for(b"train:", timeout=300)  # rank 0's first line: training has started
        deadline = time.monotonic() + 300
        while not resumable(tmp_path / "run"):
            assert time.monotonic() < deadline and terminal.process.poll() is None, terminal.text()
            terminal.record_descendants()
            time.sleep(0.5)
        terminal.record_descendants()
        assert any("raylet" in p.name() for p in terminal.seen.values())
        os.killpg(terminal.process.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends to the foreground group
        assert terminal.process.wait(120) == 130, terminal.text()
    finally:
        if terminal.process.poll() is None:
            os.killpg(terminal.process.pid, signal.SIGKILL)
    assert b"\r" in terminal.output, "no in-place progress bar on a terminal"
    assert b"re-run the same command to resume" in terminal.output
    alive = still_running(list(terminal.seen.values()), timeout=15)
    assert not alive, f"still running after Ctrl-C: {[(p.pid, p.cmdline()[:2]) for p in alive]}"

    # the re-run, its output not a terminal (as in CI or a Prefect log): plain lines, quiet, the runtime named
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "train step 120/120 (100%)" in again.stderr
    assert "step 0 of 120" not in again.stderr  # resumed from a checkpoint, not started over
    lines = [line for line in (again.stdout + again.stderr).splitlines() if line.strip()]
    repeated = {line: n for line, n in collections.Counter(lines).items() if n > 3}
    assert not repeated, f"lines repeated more than three times: {repeated}"
    assert "\r" not in again.stderr  # no carriage-return redraws
    output = "\n".join(lines)
    assert "device cpu" in output and "precision" in output and "Ray dashboard: http://127.0.0.1:" in output
    assert "model:" in output and "PlacementGroupCleaner" not in output and "Traceback" not in output
