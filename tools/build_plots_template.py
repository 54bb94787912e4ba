"""Build tools/plots_template/offline.html, the page `dvc plots show` fills, with vega, vega-lite, vega-embed inlined.

DVC's own page loads those three libraries from a CDN, so without a network the training curves do not draw.
This page carries the libraries' browser builds, unchanged, from the npm packages pinned in
tools/plots_template/package.json and locked (with integrity hashes) in package-lock.json, and the licence texts
of every package in their dependency tree. .dvc/config points `plots.html_template` at it.

    python tools/build_plots_template.py            # npm ci from the lock file: the same bytes every time
    python tools/build_plots_template.py --update   # npm install: re-resolves the tree and rewrites the lock

Needs node and npm (Debian: apt-get install npm). npm installs into a temporary folder, with install scripts off.
The page keeps DVC's placeholders: {plot_divs} (required: where DVC puts one div per plot) and {refresh_tag}
(`dvc plots show --refresh`); it leaves out {scripts}, which DVC would fill with the CDN tags.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent / "plots_template"
OUT = HERE / "offline.html"
# Load order matters: vega-lite needs vega, vega-embed needs both.
BUILDS = [("vega", "build/vega.min.js"), ("vega-lite", "build/vega-lite.min.js"),
          ("vega-embed", "build/vega-embed.min.js")]
LICENCE_NAMES = ("LICENSE", "LICENSE.md", "LICENSE.txt", "LICENCE", "license", "LICENSE-MIT.txt", "COPYING")
# The strings DVC replaces in the template; a library that contained one would be corrupted on the way.
DVC_PLACEHOLDERS = ("{plot_divs}", "{scripts}", "{refresh_tag}")

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
{refresh_tag}
<title>DVC plots</title>
<!--
Offline template for `dvc plots show`, made by tools/build_plots_template.py; do not edit by hand.
Inlined below, unchanged: __INLINED__.
They and the packages in their dependency tree carry these licences (some of those packages, e.g. the
command-line helpers, are not in the browser builds; their notices are kept all the same):

__NOTICES__
-->
<style>
  body { font-family: system-ui, sans-serif; margin: 1rem; }
  table { border-spacing: 15px; }
</style>
__SCRIPTS__
</head>
<body>
{plot_divs}
</body>
</html>
"""


def npm_install(work: Path, update: bool) -> None:
    shutil.copy(HERE / "package.json", work / "package.json")
    if not update:
        shutil.copy(HERE / "package-lock.json", work / "package-lock.json")
    command = ["npm", "install" if update else "ci", "--ignore-scripts", "--no-audit", "--no-fund"]
    if shutil.which("npm") is None:
        sys.exit("npm not found: install node and npm (Debian: apt-get install npm) and run this again")
    subprocess.run(command, cwd=work, check=True)
    if update:
        shutil.copy(work / "package-lock.json", HERE / "package-lock.json")


def dependency_tree(lock: dict) -> list[str]:
    """The lock's keys ("node_modules/a/node_modules/b") of every package the three roots need at run time."""
    packages = lock["packages"]

    def resolve(name: str, from_key: str) -> str:
        base = from_key
        while True:
            key = f"{base}/node_modules/{name}" if base else f"node_modules/{name}"
            if key in packages:
                return key
            if not base:
                raise SystemExit(f"package-lock.json: {name!r} (needed by {from_key or 'the root'}) is not in it")
            base = base.rsplit("/node_modules/", 1)[0] if "/node_modules/" in base else ""

    seen: list[str] = []
    todo = [resolve(name, "") for name in packages[""]["dependencies"]]
    while todo:
        key = todo.pop()
        if key in seen:
            continue
        seen.append(key)
        todo.extend(resolve(name, key) for name in packages[key].get("dependencies", {}))
    return sorted(seen, key=lambda k: (k.rsplit("node_modules/", 1)[1], k))


def notices(work: Path) -> str:
    """Every package with its version and licence; each distinct licence text once, under the packages it covers."""
    lock = json.loads((work / "package-lock.json").read_text())
    texts: dict[str, list[str]] = {}
    without_file: list[str] = []
    for key in dependency_tree(lock):
        meta = json.loads((work / key / "package.json").read_text())
        label = f"{meta['name']}@{meta['version']} ({meta.get('license', 'licence not stated')})"
        found = [work / key / n for n in LICENCE_NAMES if (work / key / n).is_file()]
        if found:
            texts.setdefault(found[0].read_text(encoding="utf8").strip(), []).append(label)
        else:
            author = meta.get("author")
            author = author.get("name") if isinstance(author, dict) else author
            without_file.append(f"{label}, by {author or 'its authors'}: the package ships no licence file")
    parts = []
    for text, labels in texts.items():
        parts.append("== " + ", ".join(labels) + "\n\n" + text)
    parts.append("== Packages without a licence file of their own (their licence is named above):\n"
                 + "\n".join(without_file))
    body = "\n\n".join(parts)
    if "-->" in body or "--!>" in body:
        raise SystemExit("a licence text would end the HTML comment early; quote it differently")
    return body


def scripts(work: Path) -> tuple[str, str]:
    blocks, inlined = [], []
    for name, build in BUILDS:
        version = json.loads((work / "node_modules" / name / "package.json").read_text())["version"]
        source = (work / "node_modules" / name / build).read_text(encoding="utf8")
        for bad in ("</script", *DVC_PLACEHOLDERS):
            if bad.lower() in source.lower():
                raise SystemExit(f"{name}/{build} contains {bad!r}: it cannot be inlined as is")
        blocks.append(f"<script>/* {name}@{version}: node_modules/{name}/{build} */\n{source}\n</script>")
        inlined.append(f"{name}@{version} ({build})")
    return "\n".join(blocks), ", ".join(inlined)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--update", action="store_true", help="re-resolve with npm install and rewrite the lock")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="plots_template_") as tmp:
        work = Path(tmp)
        npm_install(work, args.update)
        script_html, inlined = scripts(work)
        page = (PAGE.replace("__INLINED__", inlined).replace("__NOTICES__", notices(work))
                .replace("__SCRIPTS__", script_html))
    OUT.write_text(page, encoding="utf8")
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB): {inlined}")


if __name__ == "__main__":
    main()
