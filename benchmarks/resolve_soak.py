"""Issue 27's soak: a `loraserve serve` process resolves many distinct adapters from moto's S3 on
loopback under a store budget that holds only some of them, for a while, from a few clients at once.

Checks (each a field of the result, and the exit status):
- nothing lost: every request is answered 200, and an adapter asked again after its eviction (so
  resolved again) answers exactly as it did the first time;
- the store stays in budget: the current versions' bytes never pass the budget (plus what requests
  in flight hold), and the disk (old versions included) never passes it by more than the versions
  evicted in the last few seconds;
- RSS and open fds flat: sampled through the run, the last third's median against the first third's.
Small-rank adapters (r=1 on q_proj and v_proj, ~0.3 MB each on the default model) keep it cheap.
Full run: `python benchmarks/resolve_soak.py` (600 s, 1,000 adapters, budget 100); the integration
test runs a short one. Writes benchmarks/results/resolve_soak.json (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))  # last: tests/adapters shadows ours

PROMPT = "Once upon a time"
MAX_TOKENS = 3
WEIGHTS = "adapter_model.safetensors"
RSS_SLACK_BYTES = 96 << 20  # as the mixed-traffic soak: allocator noise on a 135M model
FD_SLACK = 16


def variants(files: dict[str, bytes], count: int) -> list[dict[str, bytes]]:
    """`count` distinct adapters from one: each lora_B scaled by its own factor (non-zero, finite)."""
    from safetensors.torch import load, save  # noqa: PLC0415

    tensors = load(files[WEIGHTS])
    out = []
    for i in range(count):
        factor = 0.5 + i / count
        scaled = {key: value * factor if ".lora_B." in key else value for key, value in tensors.items()}
        out.append({**files, WEIGHTS: save(scaled)})
    return out


def store_bytes(root: Path) -> tuple[int, int]:
    """(bytes of the current versions, bytes of every version on disk) of the store at `root`."""
    current = on_disk = 0
    versions = root / ".versions"
    for name_dir in versions.iterdir() if versions.exists() else []:
        try:
            target = os.readlink(root / name_dir.name)
        except OSError:
            target = None
        try:
            for version in name_dir.iterdir():
                size = sum(f.stat().st_size for f in version.iterdir() if f.is_file())
                on_disk += size
                if target is not None and target.endswith("/" + version.name):
                    current += size
        except FileNotFoundError:  # collected by the server while we looked: on its way out, not counted
            continue
    return current, on_disk


def rss_and_fds(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    return rss_kb * 1024, len(os.listdir(f"/proc/{pid}/fd"))


def soak(seconds: float, num_adapters: int, budget_adapters: int, clients: int, work: Path) -> dict:
    from server.engine.model_loader import load_base_model  # noqa: PLC0415
    from support.peft import make_peft_adapter  # noqa: PLC0415
    from support.servers import serve_process  # noqa: PLC0415
    from support.sources import read_adapter, s3_client, s3_server  # noqa: PLC0415

    base = read_adapter(
        make_peft_adapter(load_base_model().model, work / "base", r=1, target_modules=["q_proj", "v_proj"])
    )
    adapters = variants(base, num_adapters)
    adapter_bytes = max(sum(len(data) for data in files.values()) for files in adapters)
    budget = budget_adapters * adapter_bytes
    names = [f"soak-{i:04d}" for i in range(num_adapters)]
    with s3_server("soak") as (_, s3):
        client = s3_client()  # one client: put_adapter makes one per call, seconds each for 1,000 adapters
        for name, files in zip(names, adapters):
            for file_name, data in files.items():
                client.put_object(Bucket="soak", Key=f"loras/{name}/{file_name}", Body=data)
        print(f"{len(names)} adapters of {adapter_bytes} bytes in the store; serving", flush=True)
        store = work / "store"
        flags = ["--adapter-source", "s3://soak/loras", "--adapter-store", str(store)]
        flags += ["--adapter-store-max-bytes", str(budget), "--log-level", "warning"]
        with serve_process(work, *flags) as server, httpx.Client(base_url=server.url, timeout=120) as http:
            return _drive(server, http, s3, names, seconds, clients, store, budget, adapter_bytes)


def _drive(server, http, s3, names, seconds, clients, store, budget, adapter_bytes) -> dict:
    order = itertools.cycle(names)
    lock = threading.Lock()
    first_answer: dict[str, str] = {}
    failures: list[str] = []
    mismatches: list[str] = []
    counts = {"requests": 0, "repeats_checked": 0}
    deadline = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < deadline:
            with lock:
                name = next(order)
            body = {"model": name, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
            try:
                response = http.post("/v1/completions", json=body)
            except httpx.HTTPError as exc:
                failures.append(f"{name}: {exc!r}")
                continue
            with lock:
                counts["requests"] += 1
                if response.status_code != 200:
                    failures.append(f"{name}: {response.status_code} {response.text[:200]}")
                    continue
                text = response.json()["choices"][0]["text"]
                if name in first_answer:
                    counts["repeats_checked"] += 1
                    if first_answer[name] != text:
                        mismatches.append(name)
                else:
                    first_answer[name] = text

    samples = []
    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        rss, fds = rss_and_fds(server.process.pid)
        current, on_disk = store_bytes(store)
        samples.append(
            {"t": round(time.monotonic() - started, 1), "rss": rss, "fds": fds, "store": current, "disk": on_disk}
        )
        time.sleep(max(1.0, seconds / 60))
    for thread in threads:
        thread.join()
    metrics = http.get("/metrics").text
    third = max(1, len(samples) // 3)
    early, late = samples[:third], samples[-third:]
    rss_growth = statistics.median(s["rss"] for s in late) - statistics.median(s["rss"] for s in early)
    fd_growth = statistics.median(s["fds"] for s in late) - statistics.median(s["fds"] for s in early)
    resolutions = _metric(
        metrics, 'loraserve:adapter_source_resolutions_total{outcome="resolved",source="s3://soak/loras"}'
    )
    evictions = _metric(metrics, "loraserve:adapter_store_evictions_total")
    max_store = max(s["store"] for s in samples)
    max_disk = max(s["disk"] for s in samples)
    in_flight = clients * adapter_bytes  # held by requests, so not evictable at that moment
    result = {
        "seconds": round(time.monotonic() - started, 1),
        "adapters": len(names),
        "adapter_bytes": adapter_bytes,
        "budget_bytes": budget,
        "clients": clients,
        "requests": counts["requests"],
        "distinct_adapters_answered": len(first_answer),
        "repeats_checked": counts["repeats_checked"],
        "resolutions": resolutions,
        "evictions": evictions,
        "s3_weight_gets": s3.count(WEIGHTS),
        "failures": failures[:10],
        "num_failures": len(failures),
        "mismatched_after_eviction": mismatches[:10],
        "max_store_bytes": max_store,
        "max_disk_bytes": max_disk,
        "rss_start_mb": round(early[0]["rss"] / 2**20, 1),
        "rss_growth_mb": round(rss_growth / 2**20, 1),
        "fds_start": early[0]["fds"],
        "fd_growth": fd_growth,
        "samples": samples,
    }
    result["nothing_lost"] = not failures and not mismatches
    result["store_in_budget"] = max_store <= budget + in_flight
    result["rss_and_fds_flat"] = rss_growth <= RSS_SLACK_BYTES and fd_growth <= FD_SLACK
    return result


def _metric(exposition: str, series: str) -> float:
    line = next((line for line in exposition.splitlines() if line.startswith(series + " ")), None)
    return float("nan") if line is None else float(line.split()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--budget-adapters", type=int, default=100)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "resolve_soak.json")
    args = parser.parse_args()
    load_average = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        result = soak(args.seconds, args.adapters, args.budget_adapters, args.clients, Path(tmp))
    machine = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu": _cpu(),
        "load_average_1m_before": load_average,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    args.out.write_text(json.dumps({"machine": machine, "resolve_soak": result}, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    return 0 if result["nothing_lost"] and result["store_in_budget"] and result["rss_and_fds_flat"] else 1


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
