"""Shared helpers of the side-by-side benchmarks: timing, the device label, a ratio table."""

from __future__ import annotations

import platform
import time
from collections.abc import Callable

import torch


def device_label() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def _timed(fn: Callable[[], object]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def side_by_side(ours: Callable[[], object], peer: Callable[[], object], repeats: int = 3) -> tuple[float, float]:
    """Best wall time of each side, alternating ours/peer after a warm-up of both, so that drift in the
    machine's speed (a shared VM) cannot favour either side."""
    ours(), peer()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        times[0].append(_timed(ours))
        times[1].append(_timed(peer))
    return min(times[0]), min(times[1])


def print_table(title: str, rows: list[tuple[str, float, float, str]]) -> None:
    """rows: (what, moa, peer, unit); the ratio is moa/peer for rates (higher is better)."""
    print(f"\n{title}  [{device_label()}, torch {torch.__version__}]")
    print(f"| {'measure':<44} | {'moa':>10} | {'peer':>10} | {'ratio':>6} |")
    print(f"|{'-' * 46}|{'-' * 12}|{'-' * 12}|{'-' * 8}|")
    for what, ours, peer, unit in rows:
        print(f"| {what + ' (' + unit + ')':<44} | {ours:>10.1f} | {peer:>10.1f} | {ours / peer:>5.2f}x |")
