"""What every benchmark shares: the machine's description, side-by-side timing, peak RSS, and the result table.

Every figure a benchmark reports is a ratio of two things measured in the same run (`Figure`); absolute times
only stand beside their ratio, since on a shared 2-core machine they drift from run to run while a ratio of two
interleaved measurements mostly does not.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GOAL_OPS = {">=": lambda value, goal: value >= goal, "<=": lambda value, goal: value <= goal,
            "==": lambda value, goal: value == goal}


def cpu_model() -> str:
    """The processor's name as /proc/cpuinfo gives it (platform.processor() is often just 'x86_64')."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, str | int | bool]:
    """CPU model, cores, torch version and threads, and whether bf16 runs natively (else it is emulated)."""
    import torch

    from vlm.precision import bf16_supported

    return {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "bf16_native": bf16_supported(),
        "python": platform.python_version(),
    }


def clock(function: Callable[[], object]) -> float:
    """Wall-clock seconds of one call."""
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def side_by_side(first: Callable[[], object], second: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Best-of-`repeats` seconds of each, run alternately (first, second, first, ...) so that a slow spell of
    the machine hits both sides, not one."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        times[0].append(clock(first))
        times[1].append(clock(second))
    return min(times[0]), min(times[1])


class ForwardClock:
    """Seconds and calls of a module's forward, per kind of call: `label(args, kwargs)` names each call's kind
    (e.g. prompt pass or decode step). A profile measured inside a run, so a slow spell of the machine that
    stretches the whole run stretches both the part and the whole."""

    def __init__(self, module: Any, label: Callable[[tuple, dict], str] = lambda args, kwargs: "forward"):
        self.label = label
        self.reset()
        self._start, self._kind = 0.0, ""
        self._handles = [module.register_forward_pre_hook(self._before, with_kwargs=True),
                         module.register_forward_hook(self._after, with_kwargs=True)]

    def _before(self, module, args, kwargs) -> None:
        self._kind = self.label(args, kwargs)
        self._start = time.perf_counter()

    def _after(self, module, args, kwargs, output) -> None:
        self.seconds[self._kind] += time.perf_counter() - self._start
        self.calls[self._kind] += 1

    def reset(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def ratio(numerator: float, denominator: float) -> float:
    if denominator <= 0:
        raise ValueError(f"cannot divide by {denominator}: the denominator of a ratio must be positive")
    return numerator / denominator


def rate_ratio(count_a: float, seconds_a: float, count_b: float, seconds_b: float) -> float:
    """(count_a / seconds_a) / (count_b / seconds_b): e.g. images/s of one path over images/s of another."""
    return ratio(ratio(count_a, seconds_a), ratio(count_b, seconds_b))


def _proc_status_mib(field: str) -> float | None:
    """A memory line of /proc/self/status (Linux, in kB) in MiB; None where there is no such file."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB.

    Linux's VmHWM, not getrusage's ru_maxrss: a child started by subprocess (vfork + exec) inherits its
    parent's ru_maxrss, so a small child spawned by a large benchmark process reports the parent's peak
    (measured: 1920 MiB in a child whose own peak was 13 MiB). ru_maxrss only where /proc is missing."""
    peak = _proc_status_mib("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float:
    """This process's resident set size now, in MiB (0 where /proc is missing)."""
    return _proc_status_mib("VmRSS") or 0.0


@dataclass
class Figure:
    """One benchmark's result: a ratio, its goal ("op value", or none), and the measurements it is made of."""

    key: str            # short name, the prefix of its keys in bench.json
    title: str
    value: float
    goal: str | None    # e.g. ">= 0.9"; None where the issue sets none
    details: dict[str, float | int | str] = field(default_factory=dict)
    note: str = ""      # one line for the table: what the two sides were

    def met(self) -> bool | None:
        if self.goal is None:
            return None
        op, target = self.goal.split()
        return GOAL_OPS[op](self.value, float(target))

    def flat(self) -> dict[str, float | int | str | bool]:
        flat: dict[str, float | int | str | bool] = {f"{self.key}_ratio": round(self.value, 4)}
        if self.goal is not None:
            flat[f"{self.key}_goal"] = self.goal
            flat[f"{self.key}_goal_met"] = bool(self.met())
        flat.update({f"{self.key}_{name}": round(v, 4) if isinstance(v, float) else v
                     for name, v in self.details.items()})
        return flat


def table(figures: list[Figure], description: dict[str, object]) -> str:
    """The figures as a plain-text table, the machine's description on top."""
    lines = ["machine: " + ", ".join(f"{k} {v}" for k, v in description.items()), ""]
    width = max([len(figure.title) for figure in figures] + [len("benchmark")])
    header = f"{'benchmark':<{width}} {'value':>8}  {'goal':<8} {'met':<4} measured side by side"
    lines += [header, "-" * len(header)]
    for figure in figures:
        met = {True: "yes", False: "NO", None: "-"}[figure.met()]
        lines.append(f"{figure.title:<{width}} {figure.value:>8.3f}  {figure.goal or '-':<8} {met:<4} {figure.note}")
    return "\n".join(lines)


def write_json(path: Path, figures: list[Figure], description: dict[str, object]) -> dict[str, object]:
    """One flat JSON object: machine_* keys, then each figure's ratio, goal and measurements."""
    flat: dict[str, object] = {f"machine_{k}": v for k, v in description.items()}
    for figure in figures:
        flat.update(figure.flat())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(flat, indent=2) + "\n")
    return flat
