"""A local Prefect server (SQLite under a given PREFECT_HOME, 127.0.0.1) for development, tests and the demo.

The multi-user form: `database_url` puts its database on PostgreSQL (`infra/postgres.py`) instead of SQLite, and
`auth_string` (`user:password`) turns on `PREFECT_SERVER_API_AUTH_STRING`, so that every API call but the health
probe must carry it (`handle.env()` gives clients `PREFECT_API_AUTH_STRING`).

`start_prefect_server(home)` starts `prefect server start` in its own process group with its database at
`home/prefect.db`, on a free port (or the one given) set through `PREFECT_SERVER_API_HOST` / `PREFECT_SERVER_API_PORT`
(with `--port` the UI would still call port 4200), waits until `GET /api/health` answers and returns a `PrefectServer`
handle. `handle.env()` is what a client process needs to talk to it. The server is stopped by its PID only (SIGTERM
to its process group, SIGKILL after 10 s), never by name. Startup takes 6-45 s on a 2-core machine, hence the long
default timeout. Console output goes to `home/server.log`; a failed start raises `PrefectServerError` ending with its
tail.

For development, run it in the foreground and paste the printed `export` lines into another shell:

    python -m infra.prefect_server --home .clipforge/prefect
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from infra.processes import ServerHandle, free_port, run_in_foreground

HOST = "127.0.0.1"
DEFAULT_PORT = 4200
DEFAULT_TIMEOUT = 180.0
STOP_GRACE_SECONDS = 10.0
LOG_NAME = "server.log"

# inherited variables that would point the server at another database, profile or address than the ones we give it
_INHERITED_TO_DROP = (
    "PREFECT_API_URL",
    "PREFECT_API_KEY",
    "PREFECT_PROFILES_PATH",
    "PREFECT_UI_URL",
    "PREFECT_UI_API_URL",
)
_INHERITED_PREFIXES_TO_DROP = ("PREFECT_API_DATABASE_", "PREFECT_SERVER_DATABASE_")


class PrefectServerError(RuntimeError):
    """The Prefect server did not start (the message ends with the tail of its log) or the port is taken."""


@dataclass
class PrefectServer(ServerHandle):
    """A running `prefect server start`: where its API and UI answer, its home folder, and how to stop it."""

    port: int
    pid: int
    home: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)
    auth_string: str | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False, compare=False)

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.home / LOG_NAME

    def env(self) -> dict[str, str]:
        """The variables a client process (a flow run, a worker, `prefect` commands) needs to use this server."""
        env = {
            "PREFECT_API_URL": self.api_url,
            "PREFECT_UI_URL": self.ui_url,  # links printed in flow-run logs point here
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        if self.auth_string:
            env["PREFECT_API_AUTH_STRING"] = self.auth_string
        return env

    def exports(self) -> str:
        """`export NAME=value` lines for a shell."""
        return "\n".join(f"export {name}={value}" for name, value in self.env().items())

    def healthy(self, timeout: float = 2.0) -> bool:
        """True when `GET /api/health` answers `true`."""
        return _health(self.api_url, timeout)

    stop_grace = STOP_GRACE_SECONDS


def start_prefect_server(
    home: str | os.PathLike[str],
    port: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    attempts: int = 3,
    database_url: str | None = None,
    auth_string: str | None = None,
) -> PrefectServer:
    """Start `prefect server start` on 127.0.0.1 with its SQLite database under `home`; return once it is healthy.

    `port=None` picks a free port (and tries fresh ones if another process takes it first). Raises
    `PrefectServerError` with the tail of the log when the server exits or is not healthy within `timeout` seconds.
    `database_url`: a `postgresql+asyncpg://` URL instead of SQLite; `auth_string`: `user:password` required by the API.
    """
    home = Path(home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout
    for attempt in range(1, attempts + 1):
        chosen = port if port is not None else free_port(HOST)
        if not _port_free(chosen):
            # something else listens there; our health check would talk to it while our server fails to bind
            if port is not None:
                raise PrefectServerError(f"port {chosen} on {HOST} is already in use: pass another port or stop it")
            continue
        process = _launch(home, chosen, database_url, auth_string)
        handle = PrefectServer(port=chosen, pid=process.pid, home=home, process=process, auth_string=auth_string)
        atexit.register(handle.stop)  # an interrupted test session or script must not leave the server behind
        try:
            _wait_healthy(handle, deadline)
            return handle
        except PrefectServerError as err:
            handle.stop()
            port_race = port is None and "address already in use" in str(err).lower()
            if not (port_race and attempt < attempts and time.monotonic() < deadline):
                raise
        except BaseException:
            handle.stop()
            raise
    raise PrefectServerError(f"found no free port on {HOST} in {attempts} attempts")


@contextlib.contextmanager
def prefect_server(home: str | os.PathLike[str], **kwargs) -> Iterator[PrefectServer]:
    """`with prefect_server(tmp) as server:` runs a server for the block (see `start_prefect_server`)."""
    handle = start_prefect_server(home, **kwargs)
    try:
        yield handle
    finally:
        handle.stop()


# --- starting -------------------------------------------------------------------------------------------------------


def _server_env(home: Path, port: int, database_url: str | None = None,
                auth_string: str | None = None) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in _INHERITED_TO_DROP and not name.startswith(_INHERITED_PREFIXES_TO_DROP)
    }
    env.update(
        PREFECT_HOME=str(home),  # the database is PREFECT_HOME/prefect.db unless a connection URL says otherwise
        PREFECT_SERVER_API_HOST=HOST,
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_API_URL=f"http://{HOST}:{port}/api",  # what the server's own services and UI call
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    if database_url:  # in the environment only: a password in a URL must not reach a command line (`ps`)
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    if auth_string:
        env["PREFECT_SERVER_API_AUTH_STRING"] = auth_string
        env["PREFECT_API_AUTH_STRING"] = auth_string  # the server's own services call its API too
    return env


def _launch(home: Path, port: int, database_url: str | None = None,
            auth_string: str | None = None) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "prefect", "server", "start"]
    with open(home / LOG_NAME, "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} port {port}: {' '.join(command)}\n".encode())
        out.flush()
        return subprocess.Popen(
            command,
            cwd=home,
            env=_server_env(home, port, database_url, auth_string),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() signals the group, Ctrl-C in a shell does not
        )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _health(api_url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as response:
            return response.status == 200 and response.read().strip() == b"true"
    except (OSError, urllib.error.URLError, ValueError):
        return False


def _wait_healthy(handle: PrefectServer, deadline: float) -> None:
    """Poll `/api/health` until it answers, the process exits or the deadline passes."""
    while time.monotonic() < deadline:
        if not handle.running():
            raise PrefectServerError(
                f"Prefect server exited during startup (exit code {handle.exit_code()}){_log_tail(handle)}"
            )
        if handle.healthy():
            if handle.running():  # not another server that answered on the port while ours failed to bind
                return
        time.sleep(0.5)
    raise PrefectServerError(
        f"Prefect server at {handle.api_url} was not healthy within the timeout "
        f"(raise `timeout`; 6-45 s is normal on a small machine){_log_tail(handle)}"
    )


def _log_tail(handle: PrefectServer, lines: int = 40) -> str:
    path = handle.log_path
    if not path.exists():
        return f" (no log at {path})"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- {path} (last {len(text)} lines) ---\n" + "\n".join(text)


# --- command line ---------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.prefect_server",
        description=(
            "Run a local Prefect server (SQLite under HOME) on 127.0.0.1 in the foreground. Prints the UI address "
            "and the `export` lines that point flows and `prefect` commands at it; stops on Ctrl-C or SIGTERM."
        ),
    )
    parser.add_argument(
        "--home", type=Path, default=".clipforge/prefect", help="PREFECT_HOME: database and log (default: %(default)s)"
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="API and UI port; 0 picks a free one (default: %(default)s)"
    )
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait for health (default: %(default)s)"
    )
    parser.add_argument("--database-url", default=os.environ.get("CLIPFORGE_PREFECT_DATABASE_URL"),
                        help="postgresql+asyncpg://... from `python -m infra.postgres` (default: "
                             "$CLIPFORGE_PREFECT_DATABASE_URL, else SQLite under HOME)")
    parser.add_argument("--auth-string", default=os.environ.get("CLIPFORGE_PREFECT_AUTH_STRING"),
                        help="user:password every API client must send (default: $CLIPFORGE_PREFECT_AUTH_STRING, "
                             "else none)")
    args = parser.parse_args(argv)

    def ready(server: PrefectServer, seconds: float) -> str:
        return (f"# Prefect server ready in {seconds:.1f} s (pid {server.pid}); log {server.log_path}\n"
                f"# UI: {server.ui_url}\n# in another shell:\n{server.exports()}")

    def start() -> PrefectServer:
        return start_prefect_server(args.home, port=args.port or None, timeout=args.timeout,
                                    database_url=args.database_url, auth_string=args.auth_string)

    return run_in_foreground("Prefect server", start, PrefectServerError, ready, _log_tail)


if __name__ == "__main__":
    sys.exit(main())
