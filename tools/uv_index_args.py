"""Print `uv pip install` options that repeat pip's own configuration of where packages come from.

`make` installs with uv (an install of torch & co. takes ~30 s instead of pip's ~2.5 min), but uv does not read
pip.conf or PIP_* variables. Where a machine points pip at a mirror, local wheels or a constraints file (as CI
and offline machines do), uv must see the same, or it would resolve against PyPI alone. Reads `pip config list`
(every config file and PIP_* variable, later ones overriding earlier ones, as pip does) and prints one option per
line for the keys uv shares with pip: index-url, extra-index-url, find-links, constraint.
"""

from __future__ import annotations

import ast
import subprocess
import sys

SHARED_KEYS = ("index-url", "extra-index-url", "find-links", "constraint")


def parse_pip_config(listing: str) -> dict[str, list[str]]:
    """`pip config list` output -> {shared key: values}; a key set in several places keeps its last value."""
    settings: dict[str, list[str]] = {}
    for line in listing.splitlines():
        name, _, value = line.partition("=")
        key = name.rpartition(".")[2]  # "global.find-links", ":env:.find-links", "install.constraint"
        if key in SHARED_KEYS:
            settings[key] = ast.literal_eval(value).split()  # pip prints repr() of a whitespace-separated list
    return settings


def uv_options(settings: dict[str, list[str]]) -> list[str]:
    options = [f"--{key}={value}" for key in SHARED_KEYS for value in settings.get(key, [])]
    if settings.get("extra-index-url"):
        options.append("--index-strategy=unsafe-best-match")  # pip's rule: the best version from any index
    return options


def main() -> None:
    listing = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                             check=True).stdout
    print("\n".join(uv_options(parse_pip_config(listing))))


if __name__ == "__main__":
    main()
