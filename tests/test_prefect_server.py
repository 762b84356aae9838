"""Local Prefect server: starts healthy on a free port, runs a flow for a client process, stops without leftovers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import pytest

from infra.prefect_server import PrefectServer, PrefectServerError, prefect_server, start_prefect_server
from infra.processes import running_in_group

TINY_FLOW = textwrap.dedent(
    """
    from prefect import flow, task

    @task
    def add(a: int, b: int) -> int:
        return a + b

    @flow(name="clipforge-server-check")
    def tiny() -> int:
        return add(2, 3)

    state = tiny(return_state=True)
    print("FLOW_RUN_ID", state.state_details.flow_run_id, state.result(), flush=True)
    """
)


def test_client_env_points_at_the_server(tmp_path: Path) -> None:
    server = PrefectServer(port=4321, pid=0, home=tmp_path)
    assert server.api_url == "http://127.0.0.1:4321/api" and server.ui_url == "http://127.0.0.1:4321"
    env = server.env()
    assert env["PREFECT_API_URL"] == server.api_url
    assert env["PREFECT_HOME"] == str(tmp_path)
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"


def test_taken_port_is_refused_before_starting(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(PrefectServerError, match="already in use"):
            start_prefect_server(tmp_path, port=taken.getsockname()[1])


def test_startup_failure_reports_the_log_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_SERVER_API_KEEPALIVE_TIMEOUT", "not-a-number")  # the server refuses its settings
    with pytest.raises(PrefectServerError, match=r"exited during startup(.|\n)*keepalive_timeout"):
        start_prefect_server(tmp_path, timeout=60)


@pytest.mark.slow
def test_server_runs_a_flow_and_stops_cleanly(tmp_path: Path) -> None:
    started = time.monotonic()
    with prefect_server(tmp_path / "prefect") as server:
        print(f"Prefect server healthy after {time.monotonic() - started:.1f} s")
        with urllib.request.urlopen(f"{server.api_url}/health", timeout=5) as response:
            assert response.read() == b"true"
        assert (tmp_path / "prefect" / "prefect.db").exists()

        run = subprocess.run(
            [sys.executable, "-c", TINY_FLOW],
            env={**os.environ, **server.env()},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        line = next(line for line in run.stdout.splitlines() if line.startswith("FLOW_RUN_ID"))
        flow_run_id, result = line.split()[1:]
        assert result == "5"

        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            with get_client(sync_client=True) as client:
                flow_run = client.read_flow_run(flow_run_id)
                flow = client.read_flow(flow_run.flow_id)
        assert flow.name == "clipforge-server-check"
        assert flow_run.state is not None and flow_run.state.is_completed()

        pid = server.pid
    assert not server.running()
    assert not running_in_group(pid)  # nothing is left in the server's process group
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", server.port)) != 0  # and nothing answers on its port
