"""pipeline.storage: local folders and a real S3 endpoint (SeaweedFS, keys enforced) behind one interface."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import SecretStr

from infra.seaweedfs import SeaweedFS, start_seaweedfs
from pipeline import storage
from pipeline.errors import UserError
from pipeline.storage import StorageConfig

AWS_VARIABLES = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_REGION",
)
TABLE = pa.table({"url": ["http://a/1.jpg", "http://a/2.jpg"], "caption": ["a cat", "a dog"]})


def configured(server: SeaweedFS, secret_key: str | None = None) -> StorageConfig:
    """A StorageConfig that names the endpoint and keys itself (no environment needed)."""
    return StorageConfig(
        endpoint_url=server.endpoint_url,
        region=server.region,
        access_key_id=SecretStr(server.access_key),
        secret_access_key=SecretStr(secret_key or server.secret_key),
    )


def clear_aws_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)  # no profile on this machine leaks into a test
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)


# --- local folders (fast) -------------------------------------------------------------------------------------------


def test_local_round_trip_through_filesystem(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    fs, path = storage.filesystem("out/shards")
    assert path == str(tmp_path / "out" / "shards")  # relative locations become absolute (children run elsewhere)
    with fs.open(storage.join(path, "sub", "00000.txt"), "wb") as f:  # parent folders are created
        f.write(b"hello")
    assert (tmp_path / "out" / "shards" / "sub" / "00000.txt").read_bytes() == b"hello"
    with fs.open(storage.join(path, "sub", "00000.txt"), "rb") as f:
        assert f.read() == b"hello"


def test_local_round_trip_through_pyarrow_filesystem(tmp_path) -> None:
    fs, path = storage.pyarrow_filesystem(str(tmp_path / "tables"))
    fs.create_dir(path)
    pq.write_table(TABLE, f"{path}/urls.parquet", filesystem=fs)
    assert pq.read_table(f"{path}/urls.parquet", filesystem=fs).equals(TABLE)
    assert pq.read_table(tmp_path / "tables" / "urls.parquet").equals(TABLE)


def test_local_check_writable_creates_the_folder_and_leaves_nothing(tmp_path) -> None:
    storage.check_writable(str(tmp_path / "new" / "folder"))
    assert list((tmp_path / "new" / "folder").iterdir()) == []


def test_locations() -> None:
    assert storage.is_remote("s3://bucket/x") and not storage.is_remote("/data/x")
    assert storage.join("s3://bucket/prefix/", "a", "b.tar") == "s3://bucket/prefix/a/b.tar"
    assert storage.absolute("s3://bucket/x") == "s3://bucket/x"


def test_redact_scrubs_configured_and_environment_secrets(monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ENVKEY1234")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-5678")
    config = StorageConfig(access_key_id=SecretStr("CFGKEY9999"), secret_access_key=SecretStr("cfg-secret-0000"))
    text = "keys CFGKEY9999 cfg-secret-0000 ENVKEY1234 env-secret-5678 stay out"
    assert storage.redact(text, config) == "keys *** *** *** *** stay out"


def test_storage_config_never_dumps_secrets() -> None:
    config = StorageConfig(
        endpoint_url="http://127.0.0.1:8333",
        access_key_id=SecretStr("AKIAEXAMPLEKEY"),
        secret_access_key=SecretStr("example-secret-value"),
    )
    dumped = config.model_dump_json()
    assert "AKIAEXAMPLEKEY" not in dumped and "example-secret-value" not in dumped
    assert json.loads(dumped)["secret_access_key"] == "**********"
    assert "example-secret-value" not in repr(config) and "example-secret-value" not in str(config)


def test_subprocess_env_prefers_the_config(monkeypatch) -> None:
    clear_aws_environment(monkeypatch)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://env:1")
    config = StorageConfig(
        endpoint_url="http://127.0.0.1:9", access_key_id=SecretStr("K1234"), secret_access_key=SecretStr("S5678")
    )
    assert storage.subprocess_env(config) == {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "K1234",
        "AWS_SECRET_ACCESS_KEY": "S5678",
    }
    assert storage.subprocess_env()["AWS_ENDPOINT_URL"] == "http://env:1"


# --- a real S3 endpoint (slow: SeaweedFS) ---------------------------------------------------------------------------


@pytest.mark.slow
def test_s3_round_trip_through_filesystem(s3_env: str) -> None:
    fs, path = storage.filesystem(s3_env)
    assert path == s3_env.removeprefix("s3://")
    with fs.open(f"{path}/shards/00000.tar", "wb") as f:
        f.write(b"x" * 100_000)
    with fs.open(f"{path}/shards/00000.tar", "rb") as f:
        assert f.read() == b"x" * 100_000
    assert fs.ls(f"{path}/shards") == [f"{path}/shards/00000.tar"]  # listing is never stale (no cache)


def _write_then_fail(location: str) -> None:
    """Write b"old" at `location`, then fail half way through replacing it: b"old" stays."""
    storage.write_atomically(location, b"old")
    fs, path = storage.filesystem(location)
    with pytest.raises(RuntimeError), storage.open_atomic(fs, path) as file:
        file.write(b"half of the new content")
        raise RuntimeError("killed half way")
    assert fs.cat_file(path) == b"old"


def test_an_atomic_write_is_whole_or_absent_locally_and_a_killed_ones_leftover_is_cleared(tmp_path) -> None:
    _write_then_fail(str(tmp_path / "state.json"))
    assert os.listdir(tmp_path) == ["state.json"]  # a failed write takes its temporary file with it
    killed = subprocess.run([sys.executable, "-c", (  # a kill -9 between writing and renaming
        "import os, signal; from pipeline import storage\n"
        f"fs, path = storage.filesystem({str(tmp_path / 'state.json')!r})\n"
        "with storage.open_atomic(fs, path) as f:\n"
        "    f.write(b'new'); f.flush(); os.kill(os.getpid(), signal.SIGKILL)")], timeout=60)
    assert killed.returncode == -9
    assert (tmp_path / "state.json").read_bytes() == b"old"
    assert len(list(tmp_path.glob(".state.json.clipforge-*.tmp"))) == 1
    storage.remove_temporaries(*storage.filesystem(str(tmp_path)))
    assert os.listdir(tmp_path) == ["state.json"]
    plain = tmp_path / "other" / "plain"  # the result may be read by others as any new file may
    plain.parent.mkdir()
    plain.write_bytes(b"")
    assert (tmp_path / "state.json").stat().st_mode == plain.stat().st_mode


@pytest.mark.slow
def test_an_atomic_write_to_s3_is_whole_or_absent(s3_env: str) -> None:
    _write_then_fail(f"{s3_env}/state.json")
    fs, path = storage.filesystem(s3_env)
    assert fs.ls(path) == [f"{path}/state.json"]


@pytest.mark.slow
def test_s3_parquet_through_pyarrow_filesystem(s3_env: str) -> None:
    fs, path = storage.pyarrow_filesystem(s3_env)
    pq.write_table(TABLE, f"{path}/urls.parquet", filesystem=fs)
    assert pq.read_table(f"{path}/urls.parquet", filesystem=fs).equals(TABLE)
    fsspec_fs, fsspec_path = storage.filesystem(s3_env)  # the same object through the other interface
    with fsspec_fs.open(f"{fsspec_path}/urls.parquet", "rb") as f:
        assert pq.read_table(f).equals(TABLE)


@pytest.mark.slow
def test_environment_credentials(s3_env: str) -> None:
    storage.check_writable(s3_env)  # empty StorageConfig: endpoint and keys from AWS_* variables


@pytest.mark.slow
def test_config_credentials_without_any_environment(seaweedfs: SeaweedFS, monkeypatch) -> None:
    clear_aws_environment(monkeypatch)
    location = f"s3://clipforge/tests/config-only-{uuid.uuid4().hex[:8]}"
    config = configured(seaweedfs)
    storage.check_writable(location, config)
    fs, path = storage.pyarrow_filesystem(location, config)
    pq.write_table(TABLE, f"{path}/t.parquet", filesystem=fs)
    assert pq.read_table(f"{path}/t.parquet", filesystem=fs).num_rows == 2


@pytest.mark.slow
def test_config_credentials_take_precedence_over_environment(s3_env: str, seaweedfs: SeaweedFS, monkeypatch) -> None:
    with pytest.raises(UserError, match="credentials"):
        storage.check_writable(s3_env, configured(seaweedfs, secret_key="wrong-secret-from-config"))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-from-environment")
    storage.check_writable(s3_env, configured(seaweedfs))


@pytest.mark.slow
@pytest.mark.parametrize("where", ["config", "environment"])
def test_wrong_secret_is_a_user_error_without_credentials(
    where: str, s3_env: str, seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong_secret = "wrong-" + uuid.uuid4().hex
    if where == "config":
        config = configured(seaweedfs, secret_key=wrong_secret)
    else:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
        config = StorageConfig()
    with pytest.raises(UserError) as raised:
        storage.check_writable(s3_env, config)
    message = str(raised.value)
    assert "credentials" in message and seaweedfs.endpoint_url in message
    assert seaweedfs.access_key not in message and wrong_secret not in message and seaweedfs.secret_key not in message


@pytest.mark.slow
def test_wrong_secret_through_pyarrow_is_a_user_error(s3_env: str, seaweedfs: SeaweedFS) -> None:
    config = configured(seaweedfs, secret_key="wrong-" + uuid.uuid4().hex)
    fs, path = storage.pyarrow_filesystem(s3_env, config)
    with pytest.raises(UserError, match="credentials"), storage.storage_errors(s3_env, config):
        pq.write_table(TABLE, f"{path}/t.parquet", filesystem=fs)


@pytest.mark.slow
def test_missing_bucket_is_a_user_error_and_is_not_created(s3_env: str, seaweedfs: SeaweedFS) -> None:
    bucket = f"missing-{uuid.uuid4().hex[:12]}"
    with pytest.raises(UserError, match=f"bucket of s3://{bucket}/shards does not exist"):
        storage.check_writable(f"s3://{bucket}/shards")
    assert bucket not in [b["Name"] for b in seaweedfs.client().list_buckets()["Buckets"]]


@pytest.mark.slow
def test_stopped_endpoint_cannot_be_reached(tmp_path, monkeypatch) -> None:
    server = start_seaweedfs(tmp_path / "s3")
    config = configured(server)
    storage.check_writable("s3://clipforge/x", config)
    server.stop()
    clear_aws_environment(monkeypatch)
    # botocore retries a refused connection with backoff (~30 s in all with s3fs's own retries); one attempt suffices
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(UserError, match=f"cannot reach storage endpoint {server.endpoint_url}"):
        storage.check_writable("s3://clipforge/x", config)


def test_an_endpoint_whose_host_does_not_resolve_is_one_line_through_both_filesystems(monkeypatch) -> None:
    from pipeline.manifest import read_manifest

    clear_aws_environment(monkeypatch)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore would retry with backoff
    config = storage.StorageConfig(endpoint_url="http://no-such-host.invalid:8333", access_key_id="key-id",
                                   secret_access_key="secret")
    expected = "cannot reach storage endpoint http://no-such-host.invalid:8333 for s3://clipforge/x"
    with pytest.raises(UserError, match=expected):
        storage.check_writable("s3://clipforge/x", config)  # s3fs
    with pytest.raises(UserError, match=expected):
        read_manifest("s3://clipforge/x", config)  # pyarrow


@pytest.mark.slow
def test_subprocess_env_lets_a_child_process_list_the_bucket(seaweedfs: SeaweedFS, monkeypatch) -> None:
    clear_aws_environment(monkeypatch)
    config = configured(seaweedfs)
    prefix = f"clipforge/tests/child-{uuid.uuid4().hex[:8]}"
    fs, _ = storage.filesystem(f"s3://{prefix}", config)
    fs.pipe(f"{prefix}/hello.txt", b"hi")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")} | storage.subprocess_env(config)
    child = "import s3fs, sys; print(s3fs.S3FileSystem().ls(sys.argv[1]))"
    result = subprocess.run(
        [sys.executable, "-c", child, prefix], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{prefix}/hello.txt" in result.stdout


# ---------------------------------------------------------------------------------------------------------------------
# what travels to Ray workers (fast: no server)


def test_cluster_env_carries_the_endpoint_but_no_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "env-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "env-token")
    config = StorageConfig(endpoint_url="http://127.0.0.1:9", region="eu-west-3", profile="team",
                           access_key_id=SecretStr("cfg-key-id"), secret_access_key=SecretStr("cfg-secret"),
                           session_token=SecretStr("cfg-token"))
    assert storage.cluster_env(config) == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_DEFAULT_REGION": "eu-west-3",
                                           "AWS_PROFILE": "team"}
    # only keys given in the config are shipped; the driver's environment stays on the driver
    assert storage.explicit_credentials(config) == {"AWS_ACCESS_KEY_ID": "cfg-key-id",
                                                    "AWS_SECRET_ACCESS_KEY": "cfg-secret",
                                                    "AWS_SESSION_TOKEN": "cfg-token"}
    assert storage.explicit_credentials(StorageConfig()) == {}
    assert storage.redact("token cfg-token and env-token", config) == "token *** and ***"


def test_session_token_reaches_both_filesystems(monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    config = StorageConfig(endpoint_url="http://127.0.0.1:9", access_key_id=SecretStr("key-id"),
                           secret_access_key=SecretStr("secret"), session_token=SecretStr("session-token-123"))
    fs, _ = storage.filesystem("s3://bucket/x", config)
    assert fs.token == "session-token-123"
    arrow, _ = storage.pyarrow_filesystem("s3://bucket/x", config)
    assert b"session-token-123" in pickle.dumps(arrow)  # what Ray Train's workers unpickle
    assert "session-token-123" not in str(arrow)


def test_adopted_credentials_replace_a_token_the_worker_inherited(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SESSION_TOKEN", "inherited-token")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "inherited-id")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)  # so that monkeypatch restores what adopt sets
    storage.adopt_credentials({"AWS_ACCESS_KEY_ID": "shipped-id", "AWS_SECRET_ACCESS_KEY": "shipped-secret"})
    assert os.environ["AWS_ACCESS_KEY_ID"] == "shipped-id" and "AWS_SESSION_TOKEN" not in os.environ
    storage.adopt_credentials({})  # nothing shipped: the worker's own environment stays
    assert os.environ["AWS_ACCESS_KEY_ID"] == "shipped-id"
