"""boto3 against the minio client for the s3:// adapter source (server/sources.py): installed size,
import time in a fresh interpreter, client creation, and GET of a 30 MB object from moto's S3 server
on loopback. Writes benchmarks/results/s3_clients.json. Needs `pip install "moto[server]" minio`."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))  # last: tests/adapters shadows ours
from support.sources import s3_server  # noqa: E402

PACKAGES = {"boto3": ["boto3", "botocore", "s3transfer", "jmespath"], "minio": ["minio", "pycryptodome", "argon2-cffi"]}
SIZE = 30 * 1024 * 1024
ROUNDS = 5


def installed_bytes(packages: list[str]) -> int:
    total = 0
    for package in packages:
        for file in metadata.distribution(package).files or []:
            path = Path(file.locate())
            total += path.stat().st_size if path.is_file() else 0
    return total


def import_seconds(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    runs = [float(subprocess.check_output([sys.executable, "-c", code])) for _ in range(ROUNDS)]
    return statistics.median(runs)


def boto3_get(endpoint: str) -> tuple[float, float]:
    import boto3

    started = time.perf_counter()
    client = boto3.session.Session().client("s3")
    created = time.perf_counter() - started
    return created, median_get(lambda: client.get_object(Bucket="bench", Key="big")["Body"].read())


def minio_get(endpoint: str) -> tuple[float, float]:
    import minio

    started = time.perf_counter()
    client = minio.Minio(endpoint.removeprefix("http://"), "test", "test", secure=False, region="us-east-1")
    created = time.perf_counter() - started

    def get() -> bytes:
        response = client.get_object("bench", "big")
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    return created, median_get(get)


def median_get(get) -> float:
    runs = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        assert len(get()) == SIZE
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def main() -> None:
    results = {}
    with s3_server("bench") as (endpoint, _):
        import boto3

        boto3.session.Session().client("s3").put_object(Bucket="bench", Key="big", Body=os.urandom(SIZE))
        for name, get in (("boto3", boto3_get), ("minio", minio_get)):
            created, fetched = get(endpoint)
            results[name] = {
                "installed_mb": round(installed_bytes(PACKAGES[name]) / 1e6, 1),
                "import_s": round(import_seconds(name), 3),
                "client_create_s": round(created, 4),
                "get_30mb_s": round(fetched, 3),
            }
    machine = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu(),
        "load_average_1m_before": os.getloadavg()[0],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out = Path(__file__).parent / "results" / "s3_clients.json"
    out.write_text(json.dumps({"machine": machine, "clients": results}, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
