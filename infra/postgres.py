"""A local PostgreSQL (Debian's `postgresql`: initdb, postgres) for the Prefect server's multi-user form.

`start_postgres(workdir, password)` creates a cluster in `workdir/data` on first use (`initdb`, one superuser with
that password, scram-sha-256 for every connection), starts `postgres` listening on 127.0.0.1 only (no Unix socket),
waits until a password login succeeds, creates the database and returns a `Postgres` handle whose `url()` is what
`PREFECT_API_DATABASE_CONNECTION_URL` takes. Run as root, the server runs as the `postgres` system user (PostgreSQL
refuses root), so `workdir` must be reachable by that user. Stopped by its PID only (SIGTERM to its process group:
a "smart" shutdown once its clients are gone, SIGKILL after 10 s), never by name. The log is `workdir/postgres.log`.

For development, run it in the foreground and give the printed URL to `python -m infra.prefect_server --database-url`:

    python -m infra.postgres --dir .clipforge/postgres
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import glob
import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from infra.processes import ServerHandle, free_port, run_in_foreground

HOST = "127.0.0.1"
DEFAULT_USER = "prefect"
DEFAULT_DATABASE = "prefect"
DEFAULT_PASSWORD = "clipforge-dev-postgres"
SYSTEM_USER = "postgres"  # Debian's package creates it; the server runs as it when we are root
LOG_NAME = "postgres.log"


class PostgresError(RuntimeError):
    """PostgreSQL is missing, did not start (the message ends with the tail of its log) or refused the login."""


@dataclass
class Postgres(ServerHandle):
    """A running `postgres`: where it listens, the login, and how to stop it."""

    port: int
    user: str
    password: str = field(repr=False)
    database: str
    pid: int
    workdir: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)
    _stopped: bool = field(default=False, repr=False, compare=False)
    stop_grace = 10.0

    def url(self, driver: str = "postgresql+asyncpg") -> str:
        """The SQLAlchemy URL Prefect's server takes (it holds the password: pass it in the environment only)."""
        return f"{driver}://{self.user}:{self.password}@{HOST}:{self.port}/{self.database}"


def binary(name: str) -> str:
    """`initdb` / `postgres` on PATH, else in Debian's /usr/lib/postgresql/<version>/bin (not on PATH there)."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        raise PostgresError(f"no `{name}` found: install PostgreSQL (Debian: apt-get install postgresql)")
    return found


def start_postgres(workdir: str | os.PathLike[str], password: str = DEFAULT_PASSWORD, user: str = DEFAULT_USER,
                   database: str = DEFAULT_DATABASE, port: int | None = None, timeout: float = 60.0) -> Postgres:
    """Start PostgreSQL on 127.0.0.1 with its data in `workdir/data` (created on first use); return once a password
    login to `database` succeeds. Raises `PostgresError` with the log's tail on failure."""
    workdir = Path(workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    run_as = _run_as(workdir)
    data = workdir / "data"
    if not (data / "PG_VERSION").exists():
        _initdb(data, user, password, run_as)
    port = port or free_port(HOST)
    log = workdir / LOG_NAME
    command = [binary("postgres"), "-D", str(data), "-p", str(port), "-c", f"listen_addresses={HOST}",
               "-c", "unix_socket_directories=", "-c", "logging_collector=off"]
    with open(log, "ab") as out:
        if run_as:
            os.chown(log, run_as.pw_uid, run_as.pw_gid)
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} port {port}\n".encode())
        out.flush()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   cwd=workdir, start_new_session=True, user=run_as.pw_uid if run_as else None,
                                   group=run_as.pw_gid if run_as else None, env=_clean_env())
    handle = Postgres(port=port, user=user, password=password, database=database, pid=process.pid,
                      workdir=workdir, process=process)
    atexit.register(handle.stop)
    try:
        _wait_ready(handle, time.monotonic() + timeout)
    except BaseException:
        handle.stop()
        raise
    return handle


def _run_as(workdir: Path) -> pwd.struct_passwd | None:
    """The `postgres` user when we are root (PostgreSQL refuses to run as root), else None (ourselves)."""
    if os.geteuid() != 0:
        return None
    try:
        account = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        raise PostgresError(f"running as root needs the `{SYSTEM_USER}` system user (apt-get install postgresql)")
    for parent in workdir.parents:
        if not os.stat(parent).st_mode & 0o001:
            raise PostgresError(f"{parent} is not reachable by the `{SYSTEM_USER}` user: choose a workdir elsewhere")
    os.chown(workdir, account.pw_uid, account.pw_gid)
    return account


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}  # PGDATA, PGPORT... would override ours


def _initdb(data: Path, user: str, password: str, run_as: pwd.struct_passwd | None) -> None:
    password_file = data.parent / ".initdb-password"
    fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    if run_as:
        os.chown(password_file, run_as.pw_uid, run_as.pw_gid)
    try:
        result = subprocess.run(
            [binary("initdb"), "-D", str(data), "-U", user, f"--pwfile={password_file}", "--auth=scram-sha-256",
             "-E", "UTF8", "--locale=C", "--no-sync"],
            capture_output=True, text=True, user=run_as.pw_uid if run_as else None,
            group=run_as.pw_gid if run_as else None, env=_clean_env())
    finally:
        password_file.unlink(missing_ok=True)
    if result.returncode != 0:
        raise PostgresError(f"initdb failed: {(result.stderr or result.stdout).strip().splitlines()[-1:]}")


async def _login_and_create(handle: Postgres) -> None:
    import asyncpg  # Prefect's own PostgreSQL driver

    connection = await asyncpg.connect(host=HOST, port=handle.port, user=handle.user, password=handle.password,
                                       database="postgres", timeout=5)
    try:
        if not await connection.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", handle.database):
            await connection.execute(f'CREATE DATABASE "{handle.database}"')
    finally:
        await connection.close()


def _wait_ready(handle: Postgres, deadline: float) -> None:
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        if not handle.running():
            raise PostgresError(f"PostgreSQL exited during startup{_log_tail(handle)}")
        try:
            asyncio.run(_login_and_create(handle))
            return
        except Exception as err:  # noqa: BLE001 - refused while starting up, "the database system is starting up"
            last_error = err
            if "password authentication failed" in str(err):
                raise PostgresError(f"PostgreSQL in {handle.workdir} refused the password (it was set by initdb on "
                                    "first use)") from None
            time.sleep(0.3)
    raise PostgresError(f"PostgreSQL did not accept a login in time ({last_error}){_log_tail(handle)}")


def _log_tail(handle: Postgres, lines: int = 30) -> str:
    path = handle.workdir / LOG_NAME
    text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else []
    return f"\n--- {path} ---\n" + "\n".join(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m infra.postgres", description=(
        "Run a local PostgreSQL for the Prefect server on 127.0.0.1 in the foreground, password required; prints "
        "the PREFECT_API_DATABASE_CONNECTION_URL. Data persists in DIR/data."))
    parser.add_argument("--dir", type=Path, default=".clipforge/postgres", help="data and log (default: %(default)s)")
    parser.add_argument("--port", type=int, default=5432, help="port (default: %(default)s)")
    parser.add_argument("--password", default=os.environ.get("CLIPFORGE_POSTGRES_PASSWORD", DEFAULT_PASSWORD),
                        help="the login's password (default: $CLIPFORGE_POSTGRES_PASSWORD, else a development one)")
    args = parser.parse_args(argv)
    def ready(server: Postgres, seconds: float) -> str:
        return (f"# PostgreSQL on {HOST}:{server.port} (pid {server.pid}, ready in {seconds:.1f} s); log "
                f"{server.workdir / LOG_NAME}\nexport PREFECT_API_DATABASE_CONNECTION_URL='{server.url()}'")

    return run_in_foreground("PostgreSQL", lambda: start_postgres(args.dir, password=args.password, port=args.port),
                             PostgresError, ready, _log_tail)


if __name__ == "__main__":
    sys.exit(main())
