"""Is the machine quiet enough for the kernel plan's timings to be trusted?

A plan measured while other jobs load the CPU can be wrong by an order of magnitude for the kernels
that synchronise their threads (a thread descheduled mid-call stalls the others until the scheduler
returns it), and interleaving the candidates does not fix that: load hurts them unequally. So the
plan times a fixed reference matmul around and during each weight's measurement, on all threads and on
one, and calls a bracket quiet only if:
- its all-threads median is within MAX_SLOWDOWN of the best the reference has done on this machine
  (this run's fastest sample, or a quiet plan recorded earlier): load came, or the machine is
  slower than when it was quiet;
- its all-threads median is at most MAX_PARALLEL_RATIO times its one-thread median (quiet, it is
  about 1/threads of it): some of the threads were descheduled, the pathology above, which also
  inflates the run's own best and so escapes the first test.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F

REFERENCE = "fp32 linear [64x512] x [512x512]"  # in cache and compute-bound: it measures the cores only
MAX_SLOWDOWN = 1.5  # a quiet bracket's median against the best sample (frequency steps stay under it)
MAX_PARALLEL_RATIO = 1.2  # all threads against one; quiet is ~1/threads, a stalled thread makes it >> 1
NUM_SAMPLES = 5  # per thread count per bracket, interleaved so a burst of load hits both alike
SAMPLE_SECONDS = 1e-3


@dataclasses.dataclass(frozen=True)
class Bracket:
    """Median seconds per reference call, all threads and one, at one moment of the measurement."""

    threaded: float
    single: float


class QuietCheck:
    """Times the reference when asked, keeps the best it has seen, and judges each bracket."""

    def __init__(self, recorded_best: float | None = None):
        self.threads = torch.get_num_threads()
        self.best = recorded_best or float("inf")
        self.brackets: list[Bracket] = []

    def bracket(self) -> Bracket:
        threaded, single = time_reference(self.threads)
        self.best = min(self.best, *threaded)
        self.brackets.append(Bracket(statistics.median(threaded), statistics.median(single)))
        return self.brackets[-1]

    def is_quiet(self, bracket: Bracket) -> bool:
        return self.slowdown(bracket) <= MAX_SLOWDOWN and self.parallel_ratio(bracket) <= MAX_PARALLEL_RATIO

    def slowdown(self, bracket: Bracket) -> float:
        return bracket.threaded / self.best

    def parallel_ratio(self, bracket: Bracket) -> float:
        return bracket.threaded / bracket.single if self.threads > 1 else 0.0

    def conditions(self, brackets: list[Bracket]) -> dict:
        """What the cache file records of the measurement's conditions, judged on `brackets`."""
        return {
            "threads": self.threads,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "quiet": all(self.is_quiet(bracket) for bracket in brackets),
            "reference": REFERENCE,
            "reference_best_us": round(self.best * 1e6, 2),
            "brackets_us": [[round(b.threaded * 1e6, 2), round(b.single * 1e6, 2)] for b in brackets],
            "max_slowdown": round(max(map(self.slowdown, brackets), default=0.0), 2),
            "max_parallel_ratio": round(max(map(self.parallel_ratio, brackets), default=0.0), 2),
            "bounds": {"slowdown": MAX_SLOWDOWN, "parallel_ratio": MAX_PARALLEL_RATIO},
        }


@torch.inference_mode()
def time_reference(threads: int) -> tuple[list[float], list[float]]:
    """Seconds per call of the reference: NUM_SAMPLES samples on `threads` threads, and as many on one."""
    generator = torch.Generator().manual_seed(0)
    x, weight = torch.randn(64, 512, generator=generator), torch.randn(512, 512, generator=generator)
    threaded, single = [], []
    calls = {count: _calls_per_sample(x, weight, count) for count in {threads, 1}}
    for _ in range(NUM_SAMPLES):
        threaded.append(_sample(x, weight, threads, calls[threads]))
        single.append(_sample(x, weight, 1, calls[1]))
    return threaded, single


def _calls_per_sample(x: torch.Tensor, weight: torch.Tensor, threads: int) -> int:
    _sample(x, weight, threads, 1)  # warm-up
    return max(1, int(SAMPLE_SECONDS / max(_sample(x, weight, threads, 1), 1e-9)))


def _sample(x: torch.Tensor, weight: torch.Tensor, threads: int, calls: int) -> float:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        started = time.perf_counter()
        for _ in range(calls):
            F.linear(x, weight)
        return (time.perf_counter() - started) / calls
    finally:
        torch.set_num_threads(previous)
