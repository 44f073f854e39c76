"""Adapter sources against real parts: a directory tree, moto's S3 server on loopback through boto3,
a hub cache laid out as huggingface_hub lays it out (read offline), and a server that never answers."""

from __future__ import annotations

import time

import pytest
import torch

from adapters import InvalidAdapterError
from adapters.parse_ahead import FileChecks, ParseAhead
from server.sources import AdapterTooLargeError, SourceUnavailableError, check_source_uri, make_source
from support.sources import (
    HubApp,
    hanging_server,
    hub_server,
    put_adapter,
    read_adapter,
    s3_server,
    short_body_server,
    write_hub_cache,
)

CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
FILES = {CONFIG: b'{"r": 8}', WEIGHTS: b"x" * 1000}
BUCKET = "adapters"


@pytest.fixture(scope="module")
def s3():
    with s3_server(BUCKET) as (endpoint, app):
        put_adapter(BUCKET, "team", "sql", FILES)
        put_adapter(BUCKET, "team", "huge", {**FILES, "adapter_model.safetensors": b"x" * 5000})
        yield app


def source(uri: str, max_bytes: int = 4096, timeout_s: float = 5.0, retries: int = 2):
    return make_source(uri, max_bytes, timeout_s, retries)


def test_directory_source_reads_name_and_refuses_links_out(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sql").mkdir(parents=True)
    outside.mkdir()
    for file_name, data in FILES.items():
        (root / "sql" / file_name).write_bytes(data)
        (outside / file_name).write_bytes(data)
    (root / "evil").symlink_to(outside)
    assert source(str(root)).fetch("sql") == FILES
    assert source(f"file://{root}").fetch("absent") is None
    with pytest.raises(InvalidAdapterError, match="outside"):
        source(str(root)).fetch("evil")
    with pytest.raises(AdapterTooLargeError, match="max_upload_bytes"):
        source(str(root), max_bytes=500).fetch("sql")


@pytest.mark.parametrize("name", ["../sql", "a/b", "..", ".hidden", "x" * 200])
def test_bad_names_are_refused_before_any_read(s3, name):
    before = sum(s3.gets.values())
    with pytest.raises(InvalidAdapterError, match="name"):
        source(f"s3://{BUCKET}/team").fetch(name)
    assert sum(s3.gets.values()) == before


def test_s3_source_fetches_counts_and_bounds(s3):
    assert source(f"s3://{BUCKET}/team").fetch("sql") == FILES
    assert s3.gets[f"/{BUCKET}/team/sql/adapter_model.safetensors"] == 1
    assert source(f"s3://{BUCKET}/team").fetch("nowhere") is None
    assert source(f"s3://{BUCKET}/other").fetch("sql") is None
    with pytest.raises(AdapterTooLargeError, match="4096 bytes"):
        source(f"s3://{BUCKET}/team").fetch("huge")


def test_s3_source_missing_bucket_is_unavailable_not_absent(s3):
    with pytest.raises(SourceUnavailableError, match="NoSuchBucket"):
        source("s3://no-such-bucket/team").fetch("sql")


def test_hanging_source_fails_within_its_timeout(s3, monkeypatch):
    with hanging_server() as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", url)
        started = time.monotonic()
        with pytest.raises(SourceUnavailableError, match="failed"):
            source(f"s3://{BUCKET}/team", timeout_s=1.0, retries=3).fetch("sql")
        assert time.monotonic() - started < 3.5  # one read timeout, backoff inside the deadline


@pytest.mark.parametrize("streamed", [False, True], ids=["read-whole", "streamed"])
def test_s3_source_cut_off_mid_body_is_unavailable_after_its_retries(monkeypatch, streamed):
    """An object (its declared length within the limit) that arrives short, read whole or streamed
    into a ParseAhead, is a transient failure, retried, then SourceUnavailableError: never a short
    file passed on. The ParseAhead's worker is not left waiting for the bytes that never came."""
    ahead = ParseAhead() if streamed else None
    with short_body_server(config=FILES[CONFIG]) as url:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", url)
        with pytest.raises(SourceUnavailableError, match="failed"):
            source(f"s3://{BUCKET}/team", max_bytes=4096, retries=1).fetch("sql", ahead)
    if streamed:
        ahead.finish()  # returns: the failed download abandoned it


def test_an_s3_fetch_streams_the_weights_into_a_parse_ahead(s3, tiny_llama, make_peft_adapter, tmp_path):
    """Through moto over HTTP: the files arrive unchanged, into the ParseAhead's buffer, which has
    read their digest and extremes as the parse would."""
    files = read_adapter(make_peft_adapter(tiny_llama, tmp_path / "real", r=4, target_modules=["q_proj", "v_proj"]))
    put_adapter(BUCKET, "team", "real", files)
    ahead = ParseAhead()
    fetched = source(f"s3://{BUCKET}/team", max_bytes=len(files[WEIGHTS]) + 4096).fetch("real", ahead)
    assert fetched == files
    assert torch.frombuffer(fetched[WEIGHTS], dtype=torch.uint8).data_ptr() == ahead.buffer.data_ptr()
    facts = ahead.facts(fetched[WEIGHTS], ahead.views(fetched[WEIGHTS]))
    expected = FileChecks().facts(files[WEIGHTS], FileChecks().views(files[WEIGHTS]))
    assert facts.digest == expected.digest and torch.equal(facts.extremes, expected.extremes)


def test_hub_source_reads_the_cache_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    write_hub_cache(tmp_path, "acme/sql", FILES)
    assert source("hf://acme").fetch("sql") == FILES
    assert source("hf://acme").fetch("absent") is None
    assert source("hf://other").fetch("sql") is None


@pytest.mark.parametrize("uri", ["ftp://x", "s3://", "hf://", "file://"])
def test_unreadable_uris_are_refused(uri):
    with pytest.raises(ValueError):
        check_source_uri(uri)


def test_sources_come_from_the_environment_as_a_json_list_and_bad_ones_stop_startup(monkeypatch):
    from pydantic import ValidationError

    from server.http.settings import Settings

    monkeypatch.setenv("LORASERVE_ADAPTER_SOURCE", '["s3://bucket/prefix", "/srv/loras", "hf://acme@v1/sub"]')
    assert Settings().adapter_source == ["s3://bucket/prefix", "/srv/loras", "hf://acme@v1/sub"]
    hub = source("hf://acme@v1/sub")
    assert (hub.org, hub.revision, hub.subfolder) == ("acme", "v1", "sub")
    monkeypatch.setenv("LORASERVE_ADAPTER_SOURCE", '["gs://bucket"]')
    with pytest.raises(ValidationError, match="adapter_source"):
        Settings()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A hub on loopback (tests/support/sources.HubApp) as HF_ENDPOINT, with an empty cache, online."""
    from huggingface_hub import constants

    app = HubApp(
        {"acme/sql": FILES, "acme/huge": {**FILES, "adapter_model.safetensors": b"x" * 5000}, "acme/flaky": FILES},
        revisions=("main", "v1"),
    )
    app.repos["acme/nested"] = {f"sub/{name}": data for name, data in FILES.items()}
    app.failing.add("acme/flaky")
    with hub_server(app) as url:
        # huggingface_hub reads HF_ENDPOINT once, at import: set both as a process started with it would
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        yield app


def test_hub_source_online_downloads_into_the_cache_then_reads_it_offline(hub, monkeypatch):
    assert source("hf://acme").fetch("sql") == FILES
    assert hub.count("GET", "/acme/sql/resolve/main/adapter_model.safetensors") == 1
    assert source("hf://acme").fetch("absent") is None  # the hub's RepoNotFound
    assert source("hf://acme@v1/sub").fetch("nested") == FILES  # revision and subfolder in the URL
    assert hub.count("GET", "/acme/nested/resolve/v1/sub/adapter_config.json") == 1
    assert source("hf://acme@v2").fetch("sql") is None  # RevisionNotFound
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    before = sum(hub.requests.values())
    assert source("hf://acme").fetch("sql") == FILES  # from the cache the online fetch filled
    assert sum(hub.requests.values()) == before


def test_hub_source_refuses_an_oversized_file_before_downloading_it_and_retries_5xx(hub):
    with pytest.raises(AdapterTooLargeError, match="4096 bytes"):
        source("hf://acme").fetch("huge")
    assert hub.count("HEAD", "/acme/huge/resolve/main/adapter_model.safetensors") >= 1
    assert hub.count("GET", "/acme/huge/resolve/main/adapter_model.safetensors") == 0
    with pytest.raises(SourceUnavailableError, match="hf://acme"):
        source("hf://acme", retries=2).fetch("flaky")
    assert hub.count("HEAD", "/acme/flaky/") >= 3  # the first try and two retries, with backoff
