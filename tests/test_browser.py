"""In a real browser (Debian's chromium, driven by Playwright): the chat page of `vlm serve`, and the page of
`dvc plots show` drawing its charts with the network off.

Playwright drives the system's /usr/bin/chromium (never a browser of its own). Where that is missing the tests
are skipped, and the reason in pytest's summary says so; `.ci/run` installs chromium so that CI runs them.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 60_000  # generous: the machine may be busy; a test that works waits far less

pytestmark = pytest.mark.skipif(not CHROMIUM.is_file(),
                                reason=f"browser tests NOT run: {CHROMIUM} not found; apt-get install chromium")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: it is a test dependency, `pip install -e '.[test]'`")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Offline:
    """A browser context that answers only file:// requests; every other request is aborted and remembered.
    Console errors and uncaught exceptions of its pages are remembered too."""

    def __init__(self, browser):
        self.context = browser.new_context()
        self.blocked: list[str] = []
        self.errors: list[str] = []
        self.context.route("**/*", self._route)

    def _route(self, route) -> None:
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            self.blocked.append(route.request.url)
            route.abort("internetdisconnected")

    def open(self, path: Path):
        page = self.context.new_page()
        page.on("console", lambda message: self.errors.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.goto(path.as_uri(), wait_until="load")
        return page


# ---- dvc plots show, offline ------------------------------------------------------------------------------------

# For each vega-embed chart on the page: whether it has a canvas (vega-embed renders to one), its size, and how
# many of its pixels are painted (not transparent, not white).
CHART_PIXELS_JS = """() => [...document.querySelectorAll('.vega-embed')].map(chart => {
  const canvas = chart.querySelector('canvas');
  if (!canvas) return {canvas: false, painted: 0};
  const {width, height} = canvas;
  const data = canvas.getContext('2d').getImageData(0, 0, width, height).data;
  let painted = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i + 3] > 0 && !(data[i] > 250 && data[i + 1] > 250 && data[i + 2] > 250)) painted++;
  }
  return {canvas: true, width, height, painted};
})"""

# The purple DVC draws the workspace's line in (vega's default category colour for the first series): pixels of it
# are the curve itself, not the axes or the grid.
LINE_PIXELS_JS = """() => [...document.querySelectorAll('.vega-embed canvas')].map(canvas => {
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let line = 0;
  for (let i = 0; i < data.length; i += 4) {
    const [r, g, b, a] = [data[i], data[i + 1], data[i + 2], data[i + 3]];
    if (a > 200 && r > 120 && b > 180 && g < 120) line++;
  }
  return line;
})"""


def tiny_dvc_repo(root: Path) -> Path:
    """A DVC repository with this repository's committed .dvc/config (so its plots.html_template, at the same
    relative place) and one tiny DVCLive run: two metrics over ten steps, declared as plots in dvc.yaml."""
    (root / ".dvc").mkdir(parents=True)
    shutil.copy(REPO_ROOT / ".dvc" / "config", root / ".dvc" / "config")
    template = Path(".dvc", _configured_template())
    target = (root / template).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy((REPO_ROOT / template).resolve(), target)
    metrics = root / "dvclive" / "plots" / "metrics" / "train"
    metrics.mkdir(parents=True)
    (metrics / "loss.tsv").write_text("step\tloss\n" + "".join(f"{s}\t{3.0 / (s + 1):.4f}\n" for s in range(10)))
    (metrics / "accuracy.tsv").write_text("step\taccuracy\n" + "".join(f"{s}\t{s / 10:.2f}\n" for s in range(10)))
    (root / "dvc.yaml").write_text("plots:\n  - dvclive/plots/metrics:\n      x: step\n")
    return root


def _configured_template() -> str:
    from dvc.config import Config

    config = Config.load_file(str(REPO_ROOT / ".dvc" / "config"))
    template = config.get("plots", {}).get("html_template")
    assert template, ".dvc/config sets no plots.html_template: `dvc plots show` would load vega from a CDN"
    return template


def plots_show(repo: Path, out: Path, *extra: str) -> Path:
    result = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "-o", str(out), *extra], cwd=repo,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"dvc plots show failed:\n{result.stdout}\n{result.stderr}"
    return out / "index.html"


def test_dvc_plots_draw_offline(browser, tmp_path: Path):
    repo = tiny_dvc_repo(tmp_path / "repo")
    page_file = plots_show(repo, tmp_path / "plots")
    html = page_file.read_text()
    assert "<script src=" not in html, "the page still loads scripts from elsewhere"

    offline = Offline(browser)
    page = offline.open(page_file)
    page.wait_for_function("document.querySelectorAll('.vega-embed canvas').length === 2", timeout=TIMEOUT_MS)
    charts = page.evaluate(CHART_PIXELS_JS)
    lines = page.evaluate(LINE_PIXELS_JS)
    page.screenshot(path=str(tmp_path / "plots.png"))
    assert offline.blocked == [], f"the page asked the network for {offline.blocked}"
    assert offline.errors == [], f"errors in the browser console: {offline.errors}"
    assert len(charts) == 2 and all(c["canvas"] and c["width"] > 100 and c["height"] > 100 for c in charts), charts
    # A line over ten steps across a ~300 px wide plot: hundreds of pixels of the series colour in each chart.
    assert all(n > 200 for n in lines), f"pixels of the curves' colour per chart: {lines} (screenshot: {tmp_path})"

    # The control: the same data on DVC's own page (the CDN's script tags) draws nothing offline. Were the test
    # unable to tell, it would pass there too.
    cdn_template = tmp_path / "cdn.html"
    cdn_template.write_text("<!DOCTYPE html><html><head>{scripts}</head><body>{plot_divs}</body></html>")
    cdn_file = plots_show(repo, tmp_path / "cdn_plots", "--html-template", str(cdn_template))
    cdn = Offline(browser)
    cdn_page = cdn.open(cdn_file)
    assert any(url.startswith("https://cdn.") for url in cdn.blocked), cdn.blocked
    assert cdn_page.evaluate(CHART_PIXELS_JS) == [] and cdn.errors, "DVC's CDN page drew charts offline?"
    offline.context.close()
    cdn.context.close()


# ---- the chat page of `vlm serve` ----------------------------------------------------------------------------

API_KEY = "browser-test-key"
QUESTION = "how many objects are there?"
FOLLOW_UP = "and which colour are they?"
# What the page shows for the API's error JSON comes from the server's message; these are the page's own words.
PAGE_401_HINT = "Enter the server's API key under Settings."


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    """The real server (`vlm serve`'s app, scheduler and Assistant) on a tiny random exported model, on loopback,
    with an API key; yields (server, assistant, image policy)."""
    from tiny_models import tiny_export

    import vlm
    from vlm.messages import ImagePolicy
    from vlm.serve.app import create_app
    from vlm.serve.background import BackgroundServer
    from vlm.serve.scheduler import BatchScheduler

    model_dir = tiny_export(tmp_path_factory.mktemp("browser_serve"))
    assistant = vlm.load(model_dir)
    policy = ImagePolicy()
    scheduler = BatchScheduler(assistant, max_batch=2, gather_s=0.01)
    server = BackgroundServer(create_app(scheduler, model_dir.name, API_KEY, policy))
    yield server, assistant, policy
    server.stop()


def png_file(path: Path) -> Path:
    from PIL import Image

    image = Image.new("RGB", (48, 48), "white")
    image.paste("blue", (8, 8, 40, 40))
    image.save(path)
    return path


def test_chat_page_streams_answers_about_an_uploaded_image(browser, chat_server, tmp_path: Path):
    import base64

    from vlm.models.sampling import Sampling

    server, assistant, policy = chat_server
    image = png_file(tmp_path / "blue.png")
    page = browser.new_page(viewport={"width": 900, "height": 1000})
    problems: list[str] = []  # uncaught exceptions, and console errors other than the HTTP errors provoked below
    page.on("pageerror", lambda error: problems.append(str(error)))
    page.on("console", lambda message: problems.append(message.text)
            if message.type == "error" and "Failed to load resource" not in message.text else None)
    requests = []
    page.on("request", lambda request: requests.append(request)
            if request.url.endswith("/v1/chat/completions") else None)
    page.goto(server.url + "/")

    # Without the key the API answers 401: the page shows the server's message and opens the key field.
    page.wait_for_selector("#error:not([hidden])", timeout=TIMEOUT_MS)
    assert "Incorrect or missing API key" in page.text_content("#error")
    assert PAGE_401_HINT in page.text_content("#error")
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_function("document.getElementById('model').textContent.includes('tiny-vlm')", timeout=TIMEOUT_MS)
    assert page.is_hidden("#error")

    # Pick the image: a preview of it, as a data: URL of the file's bytes.
    page.set_input_files("#image-input", str(image))
    page.wait_for_selector("#preview-figure:not([hidden])", timeout=TIMEOUT_MS)
    assert page.get_attribute("#preview", "src") == "data:image/png;base64," + base64.b64encode(
        image.read_bytes()).decode()

    # Ask; count the changes to the answer's text as it arrives.
    page.fill("#question", QUESTION)
    page.evaluate("""() => { window.pieces = 0; new MutationObserver(records => { window.pieces += records.filter(
        r => r.target.closest && r.target.closest('.message.assistant')).length; }).observe(
        document.getElementById('log'), {subtree: true, childList: true, characterData: true}); }""")
    page.click("#send")
    page.wait_for_selector(".message.assistant[aria-busy=false]", timeout=TIMEOUT_MS)
    page.screenshot(path=str(tmp_path / "chat.png"), full_page=True)

    sent = json.loads(requests[0].post_data)
    assert sent["stream"] is True and sent["model"] == "tiny-vlm"
    assert sent["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": QUESTION},
        {"type": "image_url", "image_url": {"url": page.evaluate("document.querySelector('.thumb').src")}}]}]
    assert sent["messages"][0]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
    answer = page.text_content(".message.assistant .text")
    # The streamed pieces add up to the library's own greedy reply, and they came in more than one piece.
    assert answer == assistant.chat(sent["messages"], Sampling(), policy) and answer.strip()
    assert page.evaluate("window.pieces") >= 2
    assert page.locator(".message.user .thumb").count() == 1 and page.is_hidden("#preview-figure")

    # A second turn (Enter sends): the whole history goes along, the first answer as the assistant's turn.
    page.fill("#question", FOLLOW_UP)
    page.press("#question", "Enter")
    page.wait_for_function("document.querySelectorAll('.message.assistant[aria-busy=false]').length === 2",
                           timeout=TIMEOUT_MS)
    history = json.loads(requests[1].post_data)["messages"]
    assert history == [sent["messages"][0], {"role": "assistant", "content": answer},
                       {"role": "user", "content": FOLLOW_UP}]
    second = page.locator(".message.assistant .text").nth(1).text_content()
    assert second == assistant.chat(history, Sampling(), policy)

    # An error from the API (an image file that is not an image): its message is shown, and the question goes
    # back into the form with its image, out of the conversation.
    page.set_input_files("#image-input", {"name": "broken.png", "mimeType": "image/png", "buffer": b"not a png"})
    page.wait_for_selector("#preview-figure:not([hidden])", timeout=TIMEOUT_MS)
    assert page.is_visible("#second-image")  # the hint: one image per conversation
    page.fill("#question", "what is this?")
    page.click("#send")
    page.wait_for_selector("#error:not([hidden])", timeout=TIMEOUT_MS)
    error = page.text_content("#error")
    assert error.startswith("Error 400: ") and "(parameter: messages)" in error, error
    assert page.input_value("#question") == "what is this?" and page.is_visible("#preview-figure")
    assert page.locator(".message").count() == 4

    # Reset: an empty conversation, no image, no error.
    page.click("#reset")
    assert page.locator(".message").count() == 0 and page.is_visible("#empty-log")
    assert page.is_hidden("#preview-figure") and page.is_hidden("#error")

    # Dropping an image file on the drop zone picks it, as the file input does.
    page.evaluate("""bytes => { const transfer = new DataTransfer();
        transfer.items.add(new File([new Uint8Array(bytes)], 'dropped.png', {type: 'image/png'}));
        document.getElementById('dropzone').dispatchEvent(new DragEvent('drop', {dataTransfer: transfer})); }""",
                  list(image.read_bytes()))
    page.wait_for_selector("#preview-figure:not([hidden])", timeout=TIMEOUT_MS)
    assert page.text_content("#preview-name") == "dropped.png" and page.is_hidden("#second-image")
    assert problems == [], problems
    page.close()
