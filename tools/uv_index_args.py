"""Print `uv pip install` options that repeat pip's own configuration of where packages come from.

`make` installs with uv (an install of torch & co. takes ~30 s instead of pip's ~2.5 min), but uv does not read
pip.conf or PIP_* variables. Where a machine points pip at a mirror, local wheels or a constraints file (as CI
and offline machines do), uv must see the same, or it would resolve against PyPI alone. Reads `pip config list`
(every config file and PIP_* variable) and prints one option per line for the keys uv shares with pip:
index-url, extra-index-url, find-links, constraint.
"""

from __future__ import annotations

import ast
import subprocess
import sys

SHARED_KEYS = ("index-url", "extra-index-url", "find-links", "constraint")
# The sections `pip install` reads, weakest first (pip's ConfigOptionParser): [global], then [install], then the
# PIP_* variables (listed as ":env:"). `pip config list` prints them sorted by name, not in this order.
SECTION_ORDER = ("global", "install", ":env:")


def parse_pip_config(listing: str) -> dict[str, list[str]]:
    """`pip config list` output -> {shared key: values}, each key from the strongest section that sets it."""
    by_section: dict[str, dict[str, list[str]]] = {section: {} for section in SECTION_ORDER}
    for line in listing.splitlines():
        name, _, value = line.partition("=")
        section, _, key = name.partition(".")  # "global.find-links", ":env:.find-links", "install.constraint"
        values = ast.literal_eval(value).split() if key in SHARED_KEYS else []  # repr() of a whitespace-separated list
        if section in by_section and values:  # other commands' sections ([download], ...) do not apply; nor do empties
            by_section[section][key] = values
    settings: dict[str, list[str]] = {}
    for section in SECTION_ORDER:
        settings.update(by_section[section])
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
