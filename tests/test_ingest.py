"""Ingest: URL lists in every format, the filters, failure reasons, exact accounting, resumption, clear errors.

The end-to-end tests download over loopback HTTP from `tests.webfaults.FaultyWeb`, which mixes every fault kind of
the web into good images, and check the shards byte for byte against what was served.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from flows.cli import cli
from infra.processes import still_running
from pipeline import storage
from pipeline.download_worker import DownloadLimits, download_image
from pipeline.errors import UserError
from pipeline.failures import Fault, classify_error
from pipeline.images import check_image_bytes
from pipeline.ingest import IngestConfig, ingest, prepare_input, read_url_list
from pipeline.manifest import read_manifest
from tests import webfaults

# what each fault kind of the test server must be counted as
EXPECTED_REASON = {
    webfaults.HTTP_404: "http_404",
    webfaults.HTTP_500: "http_500",
    webfaults.CONNECTION_REFUSED: "connection_refused",
    webfaults.REDIRECT_LOOP: "redirect_loop",
    webfaults.TIMEOUT: "timeout",
    webfaults.SLOW_DRIP: "deadline_exceeded",
    webfaults.TRUNCATED: "truncated",
    webfaults.CORRUPT: "corrupt",
    webfaults.NOT_AN_IMAGE: "not_an_image",
    webfaults.DECOMPRESSION_BOMB: "decompression_bomb",
    webfaults.TINY: "too_small",
    webfaults.ROBOTS_OPTOUT: "robots_optout",
}


def write_list(rows: list[dict], path: Path) -> Path:
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "expected"} for r in rows])
    pq.write_table(table, path)
    return path


def read_shards(location: str) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """Every sample in the tars at `location`: {url: [sample, ...]} and {tar name: sample count}."""
    fs, path = storage.filesystem(location)
    samples: dict[str, list[dict]] = {}
    per_tar: dict[str, int] = {}
    for tar_path in sorted(fs.glob(f"{path}/*.tar")):
        with fs.open(tar_path, "rb") as f, tarfile.open(fileobj=f) as tar:
            members: dict[str, dict[str, bytes]] = {}
            for member in tar.getmembers():
                key, _, ext = member.name.partition(".")
                members.setdefault(key, {})[ext] = tar.extractfile(member).read()
        per_tar[os.path.basename(tar_path)] = len(members)
        for key, files in members.items():
            meta = json.loads(files["json"])
            sample = {"key": key, "caption": files["txt"].decode(), "meta": meta, "image": files["jpg"]}
            samples.setdefault(meta["url"], []).append(sample)
    return samples, per_tar


def check_ingest(location: str, rows: list[dict], web: webfaults.FaultyWeb) -> None:
    """The shards hold every good row exactly once with its caption and columns, and nothing else; the manifest
    and failures agree with the tars and with what the server did."""
    samples, per_tar = read_shards(location)
    good = web.expected_ok(rows)
    assert set(samples) == set(good), "exactly the good images arrive"
    for url, copies in samples.items():
        assert len(copies) == 1, f"{url} is in the shards {len(copies)} times"
        sample = copies[0]
        assert sample["caption"] == good[url]
        assert (sample["meta"]["original_width"], sample["meta"]["original_height"]) == web.original_size(url)
        assert sample["image"][:3] == b"\xff\xd8\xff"

    manifest = read_manifest(location)
    assert {s.path: s.samples for s in manifest.shards} == per_tar
    assert manifest.summary.successes == len(good) == manifest.num_samples
    assert manifest.summary.input_rows == len(rows)

    failures = pq.read_table(storage.filesystem(location)[0].open(storage.join(location, "failures.parquet"), "rb"))
    reason_of = {}
    for row in failures.to_pylist():
        reason_of.setdefault(row["url"], []).append(row["reason"])
    for index, row in enumerate(rows):
        if row["expected"] == webfaults.OK:
            continue
        expected = row.get("reason") or EXPECTED_REASON[row["expected"]]
        assert expected in reason_of.get(row["url"], []), f"{row['url']} should fail as {expected}, got {reason_of.get(row['url'])}"
    expected_counts = Counter(r.get("reason") or EXPECTED_REASON[r["expected"]] for r in rows if r["expected"] != webfaults.OK)
    assert manifest.summary.failures == dict(expected_counts)


def faulty_rows(web: webfaults.FaultyWeb, n_good: int, n_per_fault: int) -> list[dict]:
    """Good images, every fault kind, plus rows the input filters reject: a duplicate URL and an empty caption."""
    rows = web.url_list(n_good=n_good, n_per_fault=n_per_fault, seed=1)
    first_good = next(r for r in rows if r["expected"] == webfaults.OK)
    rows.append({"url": first_good["url"], "caption": "the same url again", "expected": "dup", "reason": "duplicate_url"})
    rows.append({"url": web.good_url(n_good + 1), "caption": "", "expected": "short", "reason": "caption_too_short"})
    rows.append({"url": "ftp://example.invalid/x.jpg", "caption": "not http", "expected": "bad", "reason": "invalid_url"})
    return rows


FAST_LIMITS = ["--timeout", "3", "--download-deadline", "6", "--samples-per-shard", "100", "--threads", "16"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------------------------------------------------------------
# fast: reading, filtering, classifying


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet", ".jsonl"])
def test_read_url_list_formats(tmp_path: Path, suffix: str) -> None:
    table = pa.table({"url": ["http://a/1.jpg", "http://a/2.jpg"], "caption": ["one", "two, with a comma"], "n": [1, 2]})
    path = tmp_path / f"list{suffix}"
    if suffix == ".parquet":
        pq.write_table(table, path)
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in table.to_pylist()))
    else:
        import pyarrow.csv

        pyarrow.csv.write_csv(table, path, pyarrow.csv.WriteOptions(delimiter="\t" if suffix == ".tsv" else ","))
    read = read_url_list(str(path))
    assert read.select(["url", "caption", "n"]).to_pylist() == table.to_pylist()


def test_prepare_input_filters_and_keeps_extra_columns() -> None:
    source = pa.table({
        "image_url": ["http://a/1.jpg", "http://a/1.jpg", "", None, "file:///etc/passwd", "http://a/2.jpg", "http://a/3.jpg"],
        "text": ["one", "dup", "no url", "null url", "local file", "x" * 50, ""],
        "sku": ["s1", "s2", "s3", "s4", "s5", "s6", "s7"],
    })
    config = IngestConfig(urls="x.csv", url_column="image_url", caption_column="text", max_caption_length=40,
                          min_caption_length=1)
    kept, rejected = prepare_input(source, config)
    assert kept.to_pylist() == [{"url": "http://a/1.jpg", "caption": "one", "row": 0, "sku": "s1"}]
    assert dict(zip(rejected["row"].to_pylist(), rejected["reason"].to_pylist())) == {
        1: "duplicate_url", 2: "missing_url", 3: "missing_url", 4: "invalid_url", 5: "caption_too_long",
        6: "caption_too_short",
    }


def test_a_caption_list_column_keeps_every_caption_and_its_first_as_the_caption() -> None:
    source = pa.table({"url": ["http://a/1.jpg", "http://a/2.jpg", "http://a/3.jpg"],
                       "texts": [["a dog", "a puppy", "dog emoji"], ["a cat"], []]})
    kept, rejected = prepare_input(source, IngestConfig(urls="x.parquet", caption_column="texts"))
    assert kept.select(["caption", "captions"]).to_pylist() == [
        {"caption": "a dog", "captions": '["a dog", "a puppy", "dog emoji"]'},  # JSON text: the loader reads it back
        {"caption": "a cat", "captions": '["a cat"]'}]
    assert rejected.select(["row", "reason"]).to_pylist() == [{"row": 2, "reason": "caption_too_short"}]


def test_prepare_input_names_the_missing_column() -> None:
    with pytest.raises(UserError, match="no URL column 'url' .*columns: link, caption.*--url-column"):
        prepare_input(pa.table({"link": ["http://a"], "caption": ["c"]}), IngestConfig(urls="x.csv"))


@pytest.mark.parametrize(
    "message, reason",
    [
        ("HTTP Error 404: Not Found", "http_404"),
        ("HTTP Error 503: Service Unavailable", "http_503"),
        ("HTTP Error 302: The HTTP server returned a redirect error that would lead to an infinite loop.\n"
         "The last 30x error message was:\nFound", "redirect_loop"),
        ("<urlopen error [Errno 111] Connection refused>", "connection_refused"),
        ("The read operation timed out", "timeout"),
        ("[deadline_exceeded] download took longer than 5 s", "deadline_exceeded"),
        ("image too small", "too_small"),
        ("Image decoding error", "corrupt"),
        ("something new", "other"),
    ],
)
def test_classify_error(message: str, reason: str) -> None:
    assert classify_error(message) == reason


@pytest.mark.parametrize("kind", [webfaults.TRUNCATED, webfaults.CORRUPT, webfaults.NOT_AN_IMAGE,
                                  webfaults.DECOMPRESSION_BOMB])
def test_content_checks_name_the_fault(faulty_web: webfaults.FaultyWeb, kind: str) -> None:
    import urllib.request

    body = urllib.request.urlopen(faulty_web.fault_url(kind), timeout=5).read()
    with pytest.raises(Fault) as caught:
        check_image_bytes(body)
    assert caught.value.kind == EXPECTED_REASON[kind]
    check_image_bytes(faulty_web.image_bytes(faulty_web.good_url(3)))  # a good image passes


def test_slow_drip_is_cut_at_the_deadline(faulty_web: webfaults.FaultyWeb, monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.download_worker as worker

    monkeypatch.setattr(worker, "_limits", DownloadLimits(deadline_seconds=2))
    started = time.monotonic()
    _, stream, error = download_image((0, faulty_web.fault_url(webfaults.SLOW_DRIP)), 10, None, None)
    assert stream is None and classify_error(error) == "deadline_exceeded"
    assert time.monotonic() - started < 8  # per-read timeout (10 s) never fired; the deadline did


def test_cli_errors_are_one_line_with_status_2(tmp_path: Path) -> None:
    runner = CliRunner()
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    no_caption = tmp_path / "nocap.csv"
    no_caption.write_text("url,title\nhttp://a/1.jpg,x\n")
    cases = {
        "does not exist": ["ingest", "--urls", str(tmp_path / "missing.csv"), "--output", str(tmp_path / "o1")],
        "is empty": ["ingest", "--urls", str(empty), "--output", str(tmp_path / "o2")],
        "no caption column 'caption'": ["ingest", "--urls", str(no_caption), "--output", str(tmp_path / "o3")],
        "must end in": ["ingest", "--urls", str(tmp_path / "list.xlsx"), "--output", str(tmp_path / "o4")],
        "image_size: Input should be greater than 0": ["ingest", "--urls", str(no_caption), "--image-size", "0"],
        "samples_per_shrd: unknown key": ["ingest", "--urls", str(no_caption), "--set", "samples_per_shrd=3"],
    }
    for expected, args in cases.items():
        result = runner.invoke(cli, args)
        assert result.exit_code == 2, (args, result.output)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and expected in lines[0], result.output
        assert "Traceback" not in result.output


def test_help_explains_every_option() -> None:
    result = CliRunner().invoke(cli, ["ingest", "--help"])
    assert result.exit_code == 0
    for name, field in IngestConfig.model_fields.items():
        assert field.description, f"{name} has no description"
        assert name in result.output or "--" + name.replace("_", "-") in result.output


# ---------------------------------------------------------------------------------------------------------------------
# slow: real downloads with img2dataset


@pytest.mark.slow
def test_ingest_faulty_web_to_local_folder(tmp_path: Path) -> None:
    with webfaults.FaultyWeb() as web:
        rows = faulty_rows(web, n_good=400, n_per_fault=10)
        assert len(rows) >= 500 and sum(r["expected"] != webfaults.OK for r in rows) / len(rows) >= 0.2
        url_list = write_list(rows, tmp_path / "list.parquet")
        output = str(tmp_path / "shards")
        started = time.monotonic()
        result = run_cli("ingest", "--urls", str(url_list), "--output", output, "--max-duration", "300", *FAST_LIMITS)
        assert result.returncode == 0, result.stderr[-2000:]
        assert time.monotonic() - started < 300  # ended within its wall-clock limit despite hanging servers
        assert "http_404" in result.stdout and "deadline_exceeded" in result.stdout
        check_ingest(output, rows, web)


@pytest.mark.slow
def test_ingest_faulty_web_to_seaweedfs(tmp_path: Path, s3_env: str) -> None:
    with webfaults.FaultyWeb() as web:
        rows = faulty_rows(web, n_good=400, n_per_fault=10)
        local_list = write_list(rows, tmp_path / "list.parquet")
        remote_list = storage.join(s3_env, "lists", "list.parquet")  # the URL list itself on object storage too
        fs, path = storage.filesystem(remote_list)
        fs.put_file(str(local_list), path)
        config = IngestConfig(urls=remote_list, output=storage.join(s3_env, "shards"), timeout=3,
                              download_deadline=6, samples_per_shard=100, max_duration=300)
        manifest = ingest(config, progress=False)
        assert manifest.summary.successes == len(web.expected_ok(rows))
        check_ingest(storage.join(s3_env, "shards"), rows, web)


@pytest.mark.slow
def test_killed_ingest_resumes_without_loss_or_duplicates(tmp_path: Path) -> None:
    with webfaults.FaultyWeb() as web:
        # slow drips in every shard keep shards in flight long enough to kill the run in the middle
        rows = web.url_list(n_good=600, n_per_fault=12, seed=2, kinds=(webfaults.SLOW_DRIP, webfaults.HTTP_404))
        url_list = write_list(rows, tmp_path / "list.parquet")
        output = tmp_path / "shards"
        args = [sys.executable, "-m", "flows.cli", "ingest", "--urls", str(url_list), "--output", str(output),
                "--samples-per-shard", "50", "--download-deadline", "4", "--timeout", "3", "--processes", "2",
                "--threads", "8"]
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 240
        while len(list(output.glob("*_stats.json"))) < 2:  # some shards done, others in flight
            assert process.poll() is None, "the ingest ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.1)
        descendants = psutil.Process(process.pid).children(recursive=True)
        process.kill()  # kill -9 of the command the user ran
        process.wait()
        done_before = len(list(output.glob("*_stats.json")))
        total_shards = -(-len(rows) // 50)
        assert done_before < total_shards, "the kill came too late to test resumption"
        alive = still_running(descendants, timeout=15)
        assert not alive, f"orphaned download processes still running: {[p.pid for p in alive]}"

        result = run_cli(*args[3:])
        assert result.returncode == 0, result.stderr[-2000:]
        samples, _ = read_shards(str(output))
        good = web.expected_ok(rows)
        assert set(samples) == set(good)
        assert all(len(copies) == 1 for copies in samples.values())
        assert read_manifest(str(output)).summary.successes == len(good)


@pytest.mark.slow
def test_success_rate_floor_fails_clearly_and_keeps_the_results(tmp_path: Path) -> None:
    with webfaults.FaultyWeb() as web:
        rows = web.url_list(n_good=5, n_per_fault=10, kinds=(webfaults.HTTP_404,))
        url_list = write_list(rows, tmp_path / "list.csv".replace(".csv", ".parquet"))
        result = run_cli("ingest", "--urls", str(url_list), "--output", str(tmp_path / "out"), "--min-success-rate",
                         "0.9", *FAST_LIMITS)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: only 5 of 15 rows succeeded (33.3%)")
    assert read_manifest(str(tmp_path / "out")).summary.successes == 5  # nothing lost


@pytest.mark.slow
def test_wrong_storage_credentials_give_one_line_and_status_2(tmp_path: Path, s3_env: str, seaweedfs) -> None:
    url_list = tmp_path / "list.csv"
    url_list.write_text("url,caption\nhttp://127.0.0.1:9/x.jpg,x\n")
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": "wrong-secret-value"}
    result = subprocess.run([sys.executable, "-m", "flows.cli", "ingest", "--urls", str(url_list), "--output", s3_env],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert len(lines) == 1 and "refused the credentials" in lines[0], result.stderr
    assert "wrong-secret-value" not in result.stderr and seaweedfs.access_key not in result.stderr


@pytest.mark.slow
def test_ingest_distributes_shards_over_a_ray_cluster(tmp_path: Path) -> None:
    from tests.raycluster import loopback_head

    with loopback_head("cfi") as (address, env), webfaults.FaultyWeb() as web:
        rows = web.url_list(n_good=150, n_per_fault=5, kinds=(webfaults.HTTP_404, webfaults.NOT_AN_IMAGE))
        url_list = write_list(rows, tmp_path / "list.parquet")
        output = tmp_path / "shards"
        result = subprocess.run(
            [sys.executable, "-m", "flows.cli", "ingest", "--urls", str(url_list), "--output", str(output),
             "--ray-address", address, *FAST_LIMITS],
            capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        check_ingest(str(output), rows, web)
    log = (output / "_clipforge" / "img2dataset.log").read_text()
    shards = {line.split("shard ")[1].split()[0] for line in log.splitlines() if "downloaded by ray task" in line}
    assert shards == {str(i) for i in range(2)}, "every shard was downloaded by a task on the Ray cluster"
