"""The kernel plan's cache file: one JSON file per machine and model shape under <cache dir>/kernels.

A file holds the plan's identity (what must match for it to apply), the conditions it was measured
under (quiet_check.QuietCheck.conditions: threads, time, the reference's timings, the verdict) and
per weight its rule and median timings. Only a plan judged quiet is final: a provisional one (noisy,
or written before the conditions were recorded) is shown but never applied, and a later start
measures again. Written atomically, so replicas starting together never read half a file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from .kernels import KernelRule, WeightKey

log = logging.getLogger(__name__)

KernelRules = dict[WeightKey, KernelRule]
Timings = Mapping[str, Mapping[int, float]]  # kernel -> rows -> median seconds per call


def plan_path(cache_dir: Path, identity: dict) -> Path:
    return cache_dir / "kernels" / f"{hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]}.json"


def read_plan(path: Path, identity: dict) -> dict | None:
    """The saved file for `identity`, or None where there is none (or it is damaged or foreign)."""
    try:
        saved = json.loads(path.read_text())
        if saved["identity"] != identity:  # a hash collision, or a file from elsewhere
            return None
        saved["rules"] = [{**entry, "weight": list(_key(entry["weight"]))} for entry in saved["rules"]]
        return saved
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:  # a damaged file: measure again, rewrite it
        log.warning("ignoring the kernel cache %s (%s)", path, exc)
        return None


def is_final(saved: dict | None) -> bool:
    return bool(saved and saved.get("conditions", {}).get("quiet"))


def final_rules(saved: dict | None) -> KernelRules | None:
    """The rules of a plan measured quietly; None for a provisional plan, which a start re-measures."""
    if not is_final(saved):
        return None
    try:
        return {_key(entry["weight"]): KernelRule(**entry["rule"]) for entry in saved["rules"]}
    except (KeyError, TypeError, ValueError):
        return None


def recorded_best(cache_dir: Path, identity: Mapping, reference: str) -> float | None:
    """Seconds per call of `reference`'s best in any quiet plan of this machine (CPU, torch, threads):
    the quiet baseline that a start under steady load is compared against."""
    best = []
    for path in (cache_dir / "kernels").glob("*.json"):
        try:
            saved = json.loads(path.read_text())
            conditions = saved["conditions"]
            if (
                conditions["quiet"]
                and conditions["reference"] == reference
                and _same_machine(saved["identity"], identity)
            ):
                best.append(conditions["reference_best_us"] * 1e-6)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a damaged or older file is no baseline
    return min(best, default=None)


def _same_machine(saved: Mapping, identity: Mapping) -> bool:
    return all(saved[name] == identity[name] for name in ("cpu", "torch", "threads"))


def write_plan(path: Path, identity: dict, conditions: dict, rules: KernelRules, timings: Mapping) -> None:
    entries = [
        {
            "weight": list(key),
            "rule": dataclasses.asdict(rule),
            "median_us": {
                kernel: {str(rows): round(seconds * 1e6, 2) for rows, seconds in by_rows.items()}
                for kernel, by_rows in timings[key].items()
            },
        }
        for key, rule in rules.items()
    ]
    text = json.dumps({"identity": identity, "conditions": conditions, "rules": entries}, indent=1)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as file:
            file.write(text)
        os.replace(file.name, path)  # atomic: replicas starting together never read half a file
    except OSError as exc:  # a read-only cache costs a measurement per start, nothing more
        log.warning("cannot cache the kernel choice in %s (%s)", path, exc)


def _key(weight: list) -> WeightKey:
    kind, out_features, in_features = weight
    return str(kind), int(out_features), int(in_features)
