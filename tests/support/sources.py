"""Real adapter sources on loopback for the tests: moto's S3 server (counting its GETs), a socket
server that accepts and never answers, and a hub cache laid out as huggingface_hub lays it out.
Nothing listens anywhere but 127.0.0.1; nothing here reaches the real hub."""

from __future__ import annotations

import collections
import hashlib
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from werkzeug.serving import WSGIRequestHandler, make_server

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args) -> None:  # one line per GET would drown the test output
        pass


class CountingS3:
    """moto's S3 as a WSGI app, counting each GET by its path (/bucket/key, path-style). A path
    containing `stall` is accepted and never answered until the server stops: a source that hangs."""

    stall = "/stalled-"

    def __init__(self):
        from moto.server import DomainDispatcherApplication, create_backend_app

        self.app = DomainDispatcherApplication(create_backend_app)
        self.gets: collections.Counter[str] = collections.Counter()
        self.stopping = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        if environ["REQUEST_METHOD"] == "GET":
            with self._lock:
                self.gets[environ["PATH_INFO"]] += 1
            if self.stall in environ["PATH_INFO"]:
                self.stopping.wait(60)
        return self.app(environ, start_response)

    def count(self, fragment: str) -> int:
        """GETs so far whose path contains `fragment`."""
        with self._lock:
            return sum(n for path, n in self.gets.items() if fragment in path)


@contextmanager
def s3_server(bucket: str) -> Iterator[tuple[str, CountingS3]]:
    """moto in server mode on a free loopback port, with AWS's own variables pointing boto3 at it
    (path-style, fake credentials) for the block; yields (endpoint URL, the counting app)."""
    app = CountingS3()
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_port}"
    env = {
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        s3_client().create_bucket(Bucket=bucket)
        yield endpoint, app
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        app.stopping.set()
        server.shutdown()
        thread.join(5)


def s3_client():
    import boto3

    return boto3.session.Session().client("s3")


def put_adapter(bucket: str, prefix: str, name: str, files: dict[str, bytes]) -> None:
    client = s3_client()
    for file_name, data in files.items():
        client.put_object(Bucket=bucket, Key=f"{prefix}/{name}/{file_name}", Body=data)


def read_adapter(path: Path) -> dict[str, bytes]:
    return {f: (path / f).read_bytes() for f in ADAPTER_FILES}


@contextmanager
def _loopback_server(on_connection: Callable[[socket.socket], None]) -> Iterator[str]:
    """A loopback socket whose accepted connections go to `on_connection`, on a thread of its own,
    until the block ends; yields its URL. Connections still open then are closed."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    listener.settimeout(0.1)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except (TimeoutError, OSError):
                continue
            on_connection(accepted[-1])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for connection in accepted:
            connection.close()
        listener.close()


def hanging_server() -> AbstractContextManager[str]:
    """A loopback socket that accepts connections and never answers; yields its URL."""
    return _loopback_server(lambda connection: None)


def short_body_server(config: bytes | None = None) -> AbstractContextManager[str]:
    """A loopback HTTP server whose every answer declares 1000 bytes, sends 500, and closes the
    connection (a store cut off mid-transfer); yields its URL. With `config`, a GET of an
    adapter_config.json gets it whole, so the cut falls in the weights file."""

    def answer_short(connection: socket.socket) -> None:
        with connection:
            request = connection.recv(65536)  # its body is empty
            if config is not None and b"adapter_config.json" in request.split(b"\r\n", 1)[0]:
                head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(config)}\r\n\r\n".encode()
                connection.sendall(head + config)
                return
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 500)

    return _loopback_server(answer_short)


def write_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes], revision: str = "0" * 40) -> None:
    """huggingface_hub's layout: models--org--name/{blobs/<etag>, snapshots/<rev>/<file> -> blob, refs/main}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    for index, (file_name, data) in enumerate(files.items()):
        blob = repo / "blobs" / f"{index:040x}"
        blob.write_bytes(data)
        (snapshot / file_name).symlink_to(os.path.relpath(blob, snapshot))


class HubApp:
    """The part of the Hugging Face hub's HTTP API that huggingface_hub's hf_hub_download and
    get_hf_file_metadata use, as a WSGI app: HEAD and GET of /{org}/{name}/resolve/{revision}/{path}
    with the hub's headers (X-Repo-Commit, ETag, Content-Length), and its 404s told apart by
    X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound). A repo in `failing` answers 503.
    Requests are counted as (method, path)."""

    commit = "c0ffee" + "0" * 34

    def __init__(self, repos: dict[str, dict[str, bytes]], revisions: tuple[str, ...] = ("main",)):
        self.repos, self.revisions, self.failing = repos, revisions, set()
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()
        self._lock = threading.Lock()

    def __call__(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
        with self._lock:
            self.requests[method, path] += 1
        org, name, resolve, revision, file_path = (path.lstrip("/").split("/", 4) + [""] * 5)[:5]
        repo = self.repos.get(f"{org}/{name}")
        if resolve != "resolve" or repo is None:
            return self._error(start_response, "404 Not Found", "RepoNotFound")
        if f"{org}/{name}" in self.failing:
            return self._error(start_response, "503 Service Unavailable", None)
        if revision not in self.revisions:
            return self._error(start_response, "404 Not Found", "RevisionNotFound")
        data = repo.get(file_path)
        if data is None:
            return self._error(start_response, "404 Not Found", "EntryNotFound")
        headers = [
            ("X-Repo-Commit", self.commit),
            ("ETag", f'"{hashlib.sha256(data).hexdigest()}"'),
            ("Content-Length", str(len(data))),
            ("Content-Type", "application/octet-stream"),
        ]
        start_response("200 OK", headers)
        return [b""] if method == "HEAD" else [data]

    @staticmethod
    def _error(start_response, status: str, code: str | None):
        headers = [("Content-Type", "application/json"), ("Content-Length", "2")]
        start_response(status, headers + ([("X-Error-Code", code)] if code else []))
        return [b"{}"]

    def count(self, method: str, fragment: str) -> int:
        with self._lock:
            return sum(n for (m, path), n in self.requests.items() if m == method and fragment in path)


@contextmanager
def hub_server(app: HubApp) -> Iterator[str]:
    """`app` on a free loopback port; yields its URL (HF_ENDPOINT for huggingface_hub)."""
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(5)
