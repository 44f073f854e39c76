"""Adapter sources: where an adapter the server does not know yet may be fetched from, by name.

One class per kind behind one call, `fetch(name) -> files | None` (None: not there):
    DirectorySource  /dir or file:///dir   <dir>/<name>/{adapter_config.json, adapter_model.safetensors}
    S3Source         s3://bucket/prefix     <prefix>/<name>/... in any S3-compatible store
    HubSource        hf://org[@rev][/sub]   repo org/<name> (at rev, under sub) through huggingface_hub's cache

A name is checked (server.store.check_name: no '/', no '..') before it becomes a path or a key, and
every source reads only under its own root. Sizes are bounded while reading (`max_bytes` over both
files, --max-upload-bytes). Transient failures (connection errors, timeouts, 5xx, throttling) are
retried with exponential backoff inside the source's deadline; anything else fails at once.

S3 client: boto3, chosen over the lighter `minio` client by measurement (benchmarks/s3_clients.py,
results in benchmarks/results/s3_clients.json): minio installs ~10 MB less and creates its client and
GETs a 30 MB object faster, but both fetch an adapter in well under the load that follows it, and
only botocore reads AWS's whole configuration chain as operators already write it
(AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_REGION, profiles, `s3.addressing_style = path` in
~/.aws/config, credential_process, the web identity tokens of EKS IRSA and Pod Identity); with minio
we would reimplement that chain. boto3 is imported only when an s3:// source is configured, and its
own retries are off: ours are the ones bounded by the source's deadline.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from adapters import InvalidAdapterError
from adapters.config import CONFIG_FILE, WEIGHTS_FILE
from adapters.errors import AdapterError, LoraServeError
from adapters.parse_ahead import ParseAhead
from server.store import check_name

Files = dict[str, bytes | memoryview]
T = TypeVar("T")
BACKOFF_S = 0.2  # first retry's wait; doubles each time
STREAM_CHUNK = 1 << 20


class SourceUnavailableError(LoraServeError):
    """A source failed or did not answer in time: the adapter may exist, so retry later (503)."""


class AdapterTooLargeError(LoraServeError):
    """A source's adapter is larger than --max-upload-bytes (413), found before it was all read."""


class UnusableSourceAdapterError(AdapterError):
    """A source had the adapter, read whole, but its files do not validate (422, naming file and field)."""


class TransientSourceError(Exception):
    """A failure worth retrying: the connection, a timeout, a 5xx or throttling."""


class Source:
    """One configured source; subclasses read one file by name (`_read`) and say what is transient."""

    def __init__(self, uri: str, max_bytes: int, timeout_s: float, retries: int):
        self.uri, self.max_bytes, self.timeout_s, self.retries = uri, max_bytes, timeout_s, retries

    @property
    def kind(self) -> str:
        """A short label for metrics and listings: dir, s3 or hf."""
        return self.uri.split("://", 1)[0] if "://" in self.uri else "dir"

    def prepare(self) -> None:
        """Pay this source's one-time costs (imports, a client) at startup, not in a first request."""

    def fetch(self, name: str, ahead: ParseAhead | None = None) -> Files | None:
        """Both adapter files of `name`, or None if this source has no such adapter. A source that
        streams the weights file (S3) streams it into `ahead`, which reads it while it arrives.
        The two files are read at once: the config's round trip is not added to the weights'."""
        check_name(name)
        deadline = time.monotonic() + self.timeout_s
        with ThreadPoolExecutor(1, thread_name_prefix="loraserve-fetch-config") as beside:
            config = beside.submit(self._retrying, lambda: self._read(name, CONFIG_FILE, self.max_bytes), deadline)
            weights = self._retrying(lambda: self._read(name, WEIGHTS_FILE, self.max_bytes, ahead), deadline)
            files = {CONFIG_FILE: config.result(), WEIGHTS_FILE: weights}
        if None in files.values():
            return None
        if sum(len(data) for data in files.values()) > self.max_bytes:
            raise self._too_large()
        return files

    def _read(
        self, name: str, file_name: str, max_bytes: int, stream: ParseAhead | None = None
    ) -> bytes | memoryview | None:
        """One file, or None if absent. `stream`, where given, may take the file as it arrives
        (`_streamed`); a source that reads it whole returns the bytes all the same."""
        raise NotImplementedError

    def _retrying(self, call: Callable[[], T], deadline: float) -> T:
        for attempt in range(self.retries + 1):
            try:
                return call()
            except TransientSourceError as exc:
                wait = BACKOFF_S * 2**attempt
                if attempt == self.retries or time.monotonic() + wait >= deadline:
                    raise SourceUnavailableError(f"adapter source {self.uri} failed: {exc}") from None
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _too_large(self) -> AdapterTooLargeError:
        return AdapterTooLargeError(
            f"the adapter in {self.uri} is larger than the limit of {self.max_bytes} bytes (setting max_upload_bytes)"
        )


class DirectorySource(Source):
    """`<root>/<name>/` (vLLM's filesystem resolver layout); no file may lead out of the root."""

    def __init__(self, uri: str, max_bytes: int, timeout_s: float, retries: int):
        super().__init__(uri, max_bytes, timeout_s, retries)
        self.root = Path(os.path.realpath(uri.removeprefix("file://")))

    def _read(self, name: str, file_name: str, max_bytes: int, stream: ParseAhead | None = None) -> bytes | None:
        path = self.root / name / file_name
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(self.root):
            raise InvalidAdapterError(f"links outside the adapter source {self.uri}", file=file_name)
        try:
            with open(real, "rb") as handle:
                data = handle.read(max_bytes + 1)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise SourceUnavailableError(
                f"adapter source {self.uri}: cannot read {file_name} ({exc.strerror})"
            ) from None
        if len(data) > max_bytes:
            raise self._too_large()
        return data


class S3Source(Source):
    """`s3://bucket/prefix`; endpoint, region, addressing and credentials from AWS's own settings."""

    def __init__(self, uri: str, max_bytes: int, timeout_s: float, retries: int):
        super().__init__(uri, max_bytes, timeout_s, retries)
        parsed = urlparse(uri)
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        self._client = None

    def prepare(self) -> None:
        self.client()  # importing boto3 and building its client took ~0.3 s of the first resolution

    def _read(
        self, name: str, file_name: str, max_bytes: int, stream: ParseAhead | None = None
    ) -> bytes | memoryview | None:
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        key = "/".join(part for part in (self.prefix, name, file_name) if part)
        try:
            response = self.client().get_object(Bucket=self.bucket, Key=key)
            length = response.get("ContentLength")
            if length is None:
                return self._bounded(response["Body"], max_bytes)
            if length > max_bytes:
                raise self._too_large()
            # Within the limit as declared: read whole, into one buffer filled from the socket
            # (botocore checks the length and, where the store sent one, the checksum). Joining
            # 1 MiB chunks wrote each byte twice more, into memory the process first faults in:
            # the join alone was ~60% of a 29 MB fetch inside a server (py-spy).
            if stream is None:
                return response["Body"].read()
            return _streamed(response["Body"], length, stream)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if error.get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            if status >= 500 or status == 429 or "Throttl" in str(error.get("Code")) or error.get("Code") == "SlowDown":
                raise TransientSourceError(f"{error.get('Code')} on {key}") from None
            raise SourceUnavailableError(f"adapter source {self.uri}: {error.get('Code')} on {key}") from None
        except BotoCoreError as exc:  # connection refused, reset, read timeout
            raise TransientSourceError(str(exc)) from None

    def _bounded(self, body, max_bytes: int) -> bytes:
        chunks, total = [], 0
        for chunk in body.iter_chunks(1 << 20):
            total += len(chunk)
            if total > max_bytes:
                body.close()
                raise self._too_large()
            chunks.append(chunk)
        return b"".join(chunks)

    def client(self):
        if self._client is None:
            import boto3  # noqa: PLC0415 - only when an s3:// source is configured
            from botocore.config import Config  # noqa: PLC0415

            config = Config(
                connect_timeout=self.timeout_s, read_timeout=self.timeout_s, retries={"total_max_attempts": 1}
            )
            self._client = boto3.session.Session().client("s3", config=config)
        return self._client


class HubSource(Source):
    """`hf://org[@revision][/subfolder]` -> repo `org/<name>`, through huggingface_hub and its cache
    (HF_HUB_CACHE, HF_HOME); HF_HUB_OFFLINE=1 reads the cache only."""

    def __init__(self, uri: str, max_bytes: int, timeout_s: float, retries: int):
        super().__init__(uri, max_bytes, timeout_s, retries)
        org, _, subfolder = uri.removeprefix("hf://").partition("/")
        self.org, _, revision = org.partition("@")
        self.revision, self.subfolder = revision or None, subfolder.strip("/") or None

    def prepare(self) -> None:
        import huggingface_hub  # noqa: F401, PLC0415 - its import is the one-time cost

    def _read(self, name: str, file_name: str, max_bytes: int, stream: ParseAhead | None = None) -> bytes | None:
        import httpx  # noqa: PLC0415
        from huggingface_hub.errors import (  # noqa: PLC0415
            EntryNotFoundError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        try:
            path = self._download(f"{self.org}/{name}", file_name, max_bytes, offline)
        except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
            return None
        except LocalEntryNotFoundError as exc:  # not cached; online, the hub could not be reached
            if offline:
                return None
            raise TransientSourceError(str(exc)) from None
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if status >= 500 or status == 429:
                raise TransientSourceError(str(exc)) from None
            raise SourceUnavailableError(f"adapter source {self.uri}: {exc}") from None
        except (OSError, httpx.TransportError) as exc:
            raise TransientSourceError(str(exc)) from None
        if os.path.getsize(path) > max_bytes:
            raise self._too_large()
        return Path(path).read_bytes()

    def _download(self, repo_id: str, file_name: str, max_bytes: int, offline: bool) -> str:
        """The file's path in the hub cache; online, its size is asked first, so an oversized file
        is refused before a byte of it is downloaded."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url  # noqa: PLC0415

        where = {"subfolder": self.subfolder, "revision": self.revision}
        if not offline:
            size = get_hf_file_metadata(hf_hub_url(repo_id, file_name, **where), timeout=self.timeout_s).size
            if size is not None and size > max_bytes:
                raise self._too_large()
        return hf_hub_download(
            repo_id,
            file_name,
            **where,
            cache_dir=os.environ.get("HF_HUB_CACHE"),
            local_files_only=offline,
            etag_timeout=self.timeout_s,
        )


KINDS: dict[str, type[Source]] = {"s3": S3Source, "hf": HubSource, "file": DirectorySource, "": DirectorySource}


def _streamed(body, length: int, stream: ParseAhead) -> memoryview:
    """An object of a declared `length` read in pieces into the buffer `stream` gives, which reads
    what a parse needs of each piece while the rest still arrives (parse_ahead.py). A body that
    ends early or runs long is transient."""
    buffer = memoryview(stream.start(length).numpy())
    filled = 0
    try:
        while filled < length:
            piece = body.read(min(STREAM_CHUNK, length - filled))
            if not piece:
                break
            buffer[filled : filled + len(piece)] = piece
            filled += len(piece)
            stream.arrived(filled)
        # One more read: botocore checks the declared length, and a checksum the store sent, at the end.
        if filled != length or body.read(1):
            raise TransientSourceError(f"the body ended after {filled} of its {length} bytes")
    except BaseException:
        stream.abandon()
        raise
    return buffer


def check_source_uri(uri: str) -> str:
    """A URI this module can read, or ValueError naming what is wrong (settings call it at startup)."""
    parsed = urlparse(uri)
    if parsed.scheme not in KINDS:
        raise ValueError(f"{uri!r}: a source is a directory, file://DIR, s3://BUCKET[/PREFIX] or hf://ORG")
    if parsed.scheme in ("s3", "hf") and not parsed.netloc:
        raise ValueError(f"{uri!r}: names no {'bucket' if parsed.scheme == 's3' else 'organisation'}")
    if parsed.scheme in ("", "file") and not parsed.path:
        raise ValueError(f"{uri!r}: names no directory")
    return uri


def make_source(uri: str, max_bytes: int, timeout_s: float, retries: int) -> Source:
    return KINDS[urlparse(check_source_uri(uri)).scheme](uri, max_bytes, timeout_s, retries)
