"""The one module that knows how to reach storage.

A location is either a local folder (the embedded default, e.g. `.clipforge/data/shards`) or `s3://bucket/prefix` on
any S3-compatible endpoint. Endpoint, region and credentials come from `StorageConfig` or, when left empty, from the
standard AWS chain of whichever process runs (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_SESSION_TOKEN`, `AWS_DEFAULT_REGION`, `AWS_PROFILE`, then profiles, web identity, instance roles). Everything else
asks this module for a filesystem, a pyarrow filesystem or the environment of a child process; nothing else reads those
settings. Credentials are `SecretStr`, so they print as `**********` in configs, manifests and reports, and `redact()`
scrubs them from any message before it is shown.

On a Ray cluster the two halves travel apart: `cluster_env()` (endpoint, region, profile name: nothing secret) goes
into the job's `runtime_env`, which Ray shows in its job API; `explicit_credentials()` (keys given in the config) is
handed to workers as a Ray object and applied there with `adopt_credentials()`. With no keys in the config, nothing
secret leaves the driver: each node's own environment (a mounted Secret, a profile, a workload identity) provides them.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import fsspec
import pyarrow.fs
from pydantic import SecretStr

from pipeline.config import Config
from pipeline.errors import UserError

S3_SCHEME = "s3://"


class StorageConfig(Config):
    """How to reach object storage. Every field left empty falls back to the standard AWS variables and profiles."""

    endpoint_url: str | None = None
    """S3-compatible endpoint, e.g. `http://127.0.0.1:8333` for a local SeaweedFS. Empty: `AWS_ENDPOINT_URL`, else AWS."""

    region: str | None = None
    """Region of the bucket. Empty: `AWS_DEFAULT_REGION` / `AWS_REGION`, else us-east-1."""

    access_key_id: SecretStr | None = None
    """Access key id. Empty: `AWS_ACCESS_KEY_ID` or the profile. Prefer the environment to writing keys in YAML."""

    secret_access_key: SecretStr | None = None
    """Secret access key. Empty: `AWS_SECRET_ACCESS_KEY` or the profile. Never logged or saved."""

    profile: str | None = None
    """Named profile in ~/.aws/credentials. Empty: `AWS_PROFILE`, else the default chain."""

    session_token: SecretStr | None = None
    """Session token of temporary keys (STS). Empty: `AWS_SESSION_TOKEN` when the keys come from the environment."""


# the variables that hold secrets: never in a Ray runtime_env, a log, a manifest or a report
CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


def is_remote(location: str) -> bool:
    return str(location).startswith(S3_SCHEME)


def join(location: str, *parts: str) -> str:
    """Join path parts onto a location, keeping `s3://` intact."""
    location = str(location)
    if is_remote(location):
        return posixpath.join(location.rstrip("/"), *parts)
    return str(Path(location, *parts))


def absolute(location: str) -> str:
    """Local folders become absolute paths (child processes may run elsewhere); s3 locations are unchanged."""
    return location if is_remote(location) else str(Path(location).expanduser().resolve())


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


def _resolved(storage: StorageConfig) -> dict[str, str | None]:
    env = os.environ
    return {
        "endpoint_url": storage.endpoint_url or env.get("AWS_ENDPOINT_URL") or env.get("AWS_ENDPOINT_URL_S3"),
        "region": storage.region or env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION"),
        "key": _secret(storage.access_key_id),
        "secret": _secret(storage.secret_access_key),
        "token": _secret(storage.session_token),
        "profile": storage.profile,
    }


def filesystem(location: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem for `location` and the path inside it (bucket/prefix for S3, an absolute local path)."""
    storage = storage or StorageConfig()
    if not is_remote(location):
        return fsspec.filesystem("file", auto_mkdir=True), absolute(location)
    import s3fs  # only needed for remote locations

    settings = _resolved(storage)
    fs = s3fs.S3FileSystem(
        key=settings["key"],
        secret=settings["secret"],
        token=settings["token"],
        profile=settings["profile"],
        endpoint_url=settings["endpoint_url"],
        client_kwargs={"region_name": settings["region"]} if settings["region"] else {},
        # several processes write the same prefix (img2dataset workers, Ray workers): never trust a cached listing
        use_listings_cache=False,
        skip_instance_cache=True,
    )
    return fs, str(location)[len(S3_SCHEME) :].rstrip("/")


def pyarrow_filesystem(location: str, storage: StorageConfig | None = None) -> tuple[pyarrow.fs.FileSystem, str]:
    """A pyarrow filesystem (for parquet, Ray Train's `storage_filesystem`) and the path inside it."""
    storage = storage or StorageConfig()
    if not is_remote(location):
        return pyarrow.fs.LocalFileSystem(), absolute(location)
    settings = _resolved(storage)
    kwargs: dict[str, Any] = {}
    if settings["endpoint_url"]:
        scheme, _, host = settings["endpoint_url"].partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    if settings["key"] and settings["secret"]:
        kwargs.update(access_key=settings["key"], secret_key=settings["secret"])
        if settings["token"]:
            kwargs["session_token"] = settings["token"]
    if settings["region"]:
        kwargs["region"] = settings["region"]
    # a directly constructed S3FileSystem ignores AWS_ENDPOINT_URL, hence the explicit endpoint_override above
    fs = pyarrow.fs.S3FileSystem(**kwargs)
    return fs, str(location)[len(S3_SCHEME) :].rstrip("/")


def subprocess_env(storage: StorageConfig | None = None) -> dict[str, str]:
    """Environment variables that let a child process (img2dataset, a Ray worker) reach the same storage."""
    storage = storage or StorageConfig()
    settings = _resolved(storage)
    names = {
        "endpoint_url": "AWS_ENDPOINT_URL",
        "region": "AWS_DEFAULT_REGION",
        "key": "AWS_ACCESS_KEY_ID",
        "secret": "AWS_SECRET_ACCESS_KEY",
        "token": "AWS_SESSION_TOKEN",
        "profile": "AWS_PROFILE",
    }
    return {names[k]: v for k, v in settings.items() if v}


def cluster_env(storage: StorageConfig | None = None) -> dict[str, str]:
    """The non-secret part of `subprocess_env` (endpoint, region, profile name), safe to put in a Ray runtime_env."""
    return {k: v for k, v in subprocess_env(storage).items() if k not in CREDENTIAL_VARIABLES}


def explicit_credentials(storage: StorageConfig | None = None) -> dict[str, str]:
    """The keys given in the config (not the environment's), as AWS variables; empty when none were given.

    These are what a driver hands to workers on other nodes (as a Ray object, never in a runtime_env); credentials
    that come from the driver's environment stay there, and each node uses its own.
    """
    storage = storage or StorageConfig()
    values = {"AWS_ACCESS_KEY_ID": _secret(storage.access_key_id),
              "AWS_SECRET_ACCESS_KEY": _secret(storage.secret_access_key),
              "AWS_SESSION_TOKEN": _secret(storage.session_token)}
    return {k: v for k, v in values.items() if v}


def adopt_credentials(credentials: dict[str, str]) -> None:
    """In a worker process: use the driver's explicit keys for every library that follows the AWS chain.

    A key pair without a session token must not be mixed with a token this process inherited, hence the removal.
    """
    if not credentials:
        return
    for name in CREDENTIAL_VARIABLES:
        os.environ.pop(name, None)
    os.environ.update({k: v for k, v in credentials.items() if k in CREDENTIAL_VARIABLES})


def redact(text: str, storage: StorageConfig | None = None) -> str:
    """Replace every known credential (configured or from the environment) in `text` with `***`."""
    storage = storage or StorageConfig()
    secrets = [_secret(storage.access_key_id), _secret(storage.secret_access_key), _secret(storage.session_token)]
    secrets += [os.environ.get(name) for name in CREDENTIAL_VARIABLES]
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


_CREDENTIAL_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken", "Forbidden", "403")
_CREDENTIAL_CODES += ("ACCESS_DENIED", "SIGNATURE_DOES_NOT_MATCH", "INVALID_ACCESS_KEY_ID")  # pyarrow spells them so
# botocore (s3fs, boto3), then pyarrow's AWS SDK (any failure to connect, an unknown host among them)
_UNREACHABLE = ("Could not connect", "EndpointConnectionError", "Connection refused", "NETWORK_CONNECTION")


def describe_storage_error(err: BaseException, location: str, storage: StorageConfig | None = None) -> str | None:
    """A one-line, credential-free explanation of a storage failure, or None if `err` is not one we recognise."""
    text = f"{type(err).__name__}: {err}"
    for cause in (err.__cause__, err.__context__):
        if cause is not None:
            text += f" {type(cause).__name__}: {cause}"
    endpoint = _resolved(storage or StorageConfig())["endpoint_url"] or "AWS S3"
    if any(code in text for code in _CREDENTIAL_CODES) or isinstance(err, PermissionError):
        return (
            f"storage at {endpoint} refused the credentials for {location}: check storage.access_key_id / "
            "storage.secret_access_key or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
        )
    if "NoSuchBucket" in text or "bucket does not exist" in text.lower():
        return f"bucket of {location} does not exist at {endpoint}: create it first"
    if any(sign in text for sign in _UNREACHABLE):
        return (f"cannot reach storage endpoint {endpoint} for {location}: is it running, and is its address right? "
                "(storage.endpoint_url or AWS_ENDPOINT_URL)")
    if isinstance(err, FileNotFoundError):
        return f"{location} does not exist"
    if isinstance(err, IsADirectoryError | NotADirectoryError):
        return f"{location} is not a file"
    return None


@contextlib.contextmanager
def storage_errors(location: str, storage: StorageConfig | None = None) -> Iterator[None]:
    """Turn recognised storage failures inside the block into a one-line `UserError`."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - every storage library raises its own family
        message = describe_storage_error(err, location, storage)
        if message is None:
            raise
        raise UserError(redact(message, storage)) from None


def check_writable(location: str, storage: StorageConfig | None = None) -> None:
    """Write and delete a marker object at `location`; raises `UserError` with the reason if that is refused."""
    fs, path = filesystem(location, storage)
    marker = posixpath.join(path, ".clipforge-write-check")
    with storage_errors(location, storage):
        if not is_remote(location):  # on S3 there are no folders, and s3fs makedirs would create a missing bucket
            fs.makedirs(path, exist_ok=True)
        with fs.open(marker, "wb") as f:
            f.write(b"ok")
        fs.rm(marker)


# ---------------------------------------------------------------------------------------------------------------------
# writing whole or not at all


_TEMPORARY_MARK = "clipforge-"  # in the name of every temporary file `open_atomic` makes, and only there


@contextlib.contextmanager
def open_atomic(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[BinaryIO]:
    """A file whose content replaces `path` when the block ends without error: readers see the old content or the new,
    never a part, and a kill -9 on the way leaves the old. Locally a hidden temporary file beside `path`, fsynced,
    renamed over it and the rename fsynced (it survives a power cut too); a kill leaves that file, which
    `remove_temporaries` clears. To S3 a local temporary file sent in one upload (multipart when large) at the end.
    Either way memory never holds the whole content."""
    if "file" not in fs.protocol:  # S3: an object appears whole when its upload completes
        with tempfile.NamedTemporaryFile(prefix=_TEMPORARY_MARK) as file:
            yield file
            file.flush()
            fs.put_file(file.name, path)
        return
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    # same folder, so the rename stays within one filesystem; concurrent writers each have their own temporary file,
    # created as any new file is (the umask's mode: mkstemp's 0600 would lock other readers out of the result)
    temporary = os.path.join(folder, f".{name}.{_TEMPORARY_MARK}{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "xb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
    fsync_folder(folder)


def write_atomically(location: str, data: bytes, storage: StorageConfig | None = None) -> None:
    """Write `data` to `location` (see `open_atomic`), a storage failure as a one-line `UserError`."""
    fs, path = filesystem(location, storage)
    with storage_errors(location, storage), open_atomic(fs, path) as file:
        file.write(data)


def remove_temporaries(fs: fsspec.AbstractFileSystem, folder: str) -> None:
    """Delete what killed `open_atomic` writes left in the local `folder`; only for a folder one job owns."""
    if "file" in fs.protocol and os.path.isdir(folder):
        for leftover in Path(folder).glob(f".*.{_TEMPORARY_MARK}*.tmp"):
            leftover.unlink(missing_ok=True)


def fsync_folder(path: str) -> None:
    """Make a rename or a new file in the local folder `path` durable: it survives a power cut, not only a kill."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
