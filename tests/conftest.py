"""Shared fixtures: one real S3 server (SeaweedFS) per test session, a per-test S3 location, a faulty web server.

A test that uses `seaweedfs` (directly or through `s3_env`) must be marked `@pytest.mark.slow`; collection fails
otherwise, so `pytest -m "not slow"` never starts a server.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator

import pytest

# set before anything imports prefect or albumentations (img2dataset): no analytics, no update check over the network
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["NO_ALBUMENTATIONS_UPDATE"] = "1"

from infra.seaweedfs import SeaweedFS, start_seaweedfs  # noqa: E402
from tests.webfaults import FaultyWeb  # noqa: E402

TEST_BUCKET = "clipforge"
# variables that would otherwise send a test's S3 calls somewhere else or sign them with other keys
_AWS_VARIABLES_TO_CLEAR = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unmarked = [
        item.nodeid
        for item in items
        if "seaweedfs" in getattr(item, "fixturenames", ()) and item.get_closest_marker("slow") is None
    ]
    if unmarked:
        names = ", ".join(unmarked)
        raise pytest.UsageError(f"tests using the seaweedfs fixture must be marked @pytest.mark.slow: {names}")


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One SeaweedFS for the whole session, keys enforced, bucket `clipforge` created; stopped at the end."""
    server = start_seaweedfs(
        tmp_path_factory.mktemp("seaweedfs"),
        access_key=f"test-{uuid.uuid4().hex[:8]}",
        secret_key=uuid.uuid4().hex,
        buckets=(TEST_BUCKET,),
    )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """Point the standard AWS variables at the session's SeaweedFS for this test; return a fresh `s3://` location."""
    for name in _AWS_VARIABLES_TO_CLEAR:
        monkeypatch.delenv(name, raising=False)
    for name, value in seaweedfs.env().items():
        monkeypatch.setenv(name, value)
    name = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:60]
    return f"s3://{TEST_BUCKET}/tests/{name}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def faulty_web() -> Iterator[FaultyWeb]:
    """A loopback web server serving good images and every fault kind in `tests.webfaults` (fast, not slow)."""
    with FaultyWeb() as web:
        yield web
