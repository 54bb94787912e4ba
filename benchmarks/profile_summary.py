"""Where a benchmark's time goes: shares of py-spy samples whose stack passes through given functions.

    py-spy record --format raw -r 50 -o prof.txt -- .venv/bin/python -m benchmarks --only cache_payoff
    .venv/bin/python -m benchmarks.profile_summary prof.txt "backbone=VisionBackbone.forward" \\
        "decode=decode_image" "preprocess=VisionBackbone.preprocess" "backward=backward" ...

Each LABEL=PATTERN counts the samples with a frame whose function name contains PATTERN; a sample is given to
the first label that matches it, so list inner regions before the outer ones that contain them. The rest is
reported as "other". py-spy's raw format is one line per distinct stack: `frame;frame;...;frame COUNT`.
"""

from __future__ import annotations

import sys
from pathlib import Path


def summarise(lines: list[str], groups: list[tuple[str, str]]) -> dict[str, int]:
    """Samples per label (and "other") from py-spy raw lines."""
    counts = {label: 0 for label, _ in groups} | {"other": 0}
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        functions = [frame.split(" (", 1)[0] for frame in stack.split(";")]
        label = next((label for label, pattern in groups if any(pattern in f for f in functions)), "other")
        counts[label] += int(count)
    return counts


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit(__doc__)
    groups = [tuple(arg.split("=", 1)) for arg in argv[1:]]
    counts = summarise(Path(argv[0]).read_text().splitlines(), groups)
    total = sum(counts.values()) or 1
    for label, count in counts.items():
        print(f"{label:<28} {count:>7} samples  {count / total:6.1%}")


if __name__ == "__main__":
    main(sys.argv[1:])
