"""Screenshot of the chat page answering a question about an image: docs/img/chat.png, the README's picture.

Starts `vlm serve` on a free loopback port with the given model, opens its page in Debian's chromium (driven by
Playwright, as tests/test_browser.py does), picks the image, asks the question, waits for the whole streamed
answer and saves the page's image panel and conversation as a small PNG (a 64-colour palette).

    python tools/chat_screenshot.py --image samples/test-000000.png --question "how many objects are there?"

Run from the repository root after `dvc repro` (the model in models/vlm) or with --model naming a folder written
by `vlm export`; the venv's python, so that `python -m vlm.cli` is this checkout's.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from PIL import Image

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
WAIT_S = 600  # loading the real model and answering on a busy CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"`vlm serve` exited with code {server.returncode} before it answered {url}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    sys.exit(f"`vlm serve` did not answer {url} within {WAIT_S} s")


def screenshot(url: str, image: Path, question: str, out: Path) -> str:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 760, "height": 900})
        page.goto(url)
        page.wait_for_function("document.getElementById('model').textContent.startsWith('Model: ')")
        page.set_input_files("#image-input", str(image))
        page.fill("#question", question)
        page.click("#send")
        page.wait_for_selector(".message.assistant[aria-busy=false]", timeout=WAIT_S * 1000)
        if page.is_visible("#error"):
            sys.exit(f"the page shows an error: {page.text_content('#error')}")
        answer = page.text_content(".message.assistant .text")
        # From the top of the page to the end of the conversation's form: what the page is for.
        bottom = page.eval_on_selector("#composer", "e => e.getBoundingClientRect().bottom + window.scrollY")
        page.screenshot(path=str(out), full_page=True, clip={"x": 0, "y": 0, "width": 760, "height": bottom + 16})
        browser.close()
    Image.open(out).convert("RGB").quantize(colors=64).save(out, optimize=True)
    return answer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", type=Path, required=True, help="the image to ask about")
    parser.add_argument("--question", required=True)
    parser.add_argument("--model", type=Path, default=Path("models/vlm"), help="as `vlm serve --model`")
    parser.add_argument("--out", type=Path, default=Path("docs/img/chat.png"))
    args = parser.parse_args()
    if not args.image.is_file():
        sys.exit(f"{args.image}: no such image (`vlm extract-images samples/` writes a few test images)")
    if not Path(CHROMIUM).is_file():
        sys.exit(f"{CHROMIUM} not found: apt-get install chromium")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "vlm.cli", "serve", "--model", str(args.model),
                               "--port", str(port)])
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", server)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        answer = screenshot(f"http://127.0.0.1:{port}/", args.image, args.question, args.out)
    finally:
        server.terminate()
        server.wait(30)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB); the answer: {answer}")


if __name__ == "__main__":
    main()
