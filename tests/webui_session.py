"""The web page tests' session (a pytest plugin, loaded by conftest.py): one Chromium and one real server.

Fixtures here, not in a test module, so that every page test module shares them: pytest makes a session
fixture once per module that imports it, and a second Playwright driver cannot start while the first runs.

The server (`python -m inf_llm.serve`, the default served config: SmolLM2-135M on CPU) starts on a free
loopback port with a fresh converted-weights cache, so the GGUF is really converted (15-50 s): with a warm
cache the model is ready in about a second, before the server (busy loading) has even sent the page its
scripts, and the loading screen could not be tested. Its documents go to a session folder. Set
INF_LLM_WEBUI_URL=http://host:port/ to run the page tests against a server that is already running.
Playwright is imported when a fixture first needs it: without it the page tests skip, the rest still run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG = REPO_ROOT / "config" / "working" / "smollm2-135m-inf-llm.yaml"
SCREENSHOTS = REPO_ROOT / "artifacts" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
EXTERNAL_URL = os.environ.get("INF_LLM_WEBUI_URL")
# The port answers at once; loading the model (cold GGUF conversion included) takes ~15-20 s on 2 cores.
PORT_TIMEOUT_S = 60
READY_TIMEOUT_S = 180
# Injected before the page's own scripts (CDP init script, not subject to the page's CSP): records what the
# page showed at each change of its status dot, so a loading phase of a second is still seen.
STATUS_RECORDER_JS = """
window.__seen = [];
document.addEventListener('DOMContentLoaded', () => {
  const dot = document.getElementById('status-dot');
  const record = () => window.__seen.push({
    state: dot.dataset.state,
    screen: !document.getElementById('loading-screen').hidden,
    title: document.getElementById('loading-title').textContent,
    bar: !!document.querySelector('#loading-progress .progress-fill'),
    phase: document.getElementById('loading-phase').textContent,
  });
  new MutationObserver(record).observe(dot, {attributes: true, attributeFilter: ['data-state']});
  record();
});
"""

# ------------------------------------------------------------------------------------------- server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_status(base_url: str) -> tuple[int, dict] | None:
    """(HTTP status, JSON body) of GET /status, or None when the server does not answer."""
    try:
        with urllib.request.urlopen(base_url + "status", timeout=5) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as e:
        try:
            return e.code, json.loads(e.read())
        except ValueError:
            return e.code, {}
    except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
        return None


class Server:
    def __init__(self, base_url: str, proc: subprocess.Popen | None, log_path: Path | None):
        self.base_url = base_url
        self.proc = proc
        self.log_path = log_path
        self.first_state: str | None = None  # the state of the server's first /status answer
        self.early_page: Page | None = None  # opened the moment the port answered (records the loading phase)

    def log_tail(self, n: int = 4000) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-n:]

    def wait_ready(self) -> dict:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            st = get_status(self.base_url)
            if st and st[0] == 200 and st[1].get("ready"):
                return st[1]
            if st and st[1].get("state") == "error":
                pytest.fail(f"server failed to load the model: {st[1].get('error')}\n{self.log_tail()}")
            time.sleep(0.5)
        pytest.fail(f"server not ready after {READY_TIMEOUT_S} s:\n{self.log_tail()}")


@pytest.fixture(scope="session")
def server(browser: Browser, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real server on a free loopback port; yields as soon as the port answers (the model still loading).

    Depends on `browser` so Chromium is up before the server starts: the first test can open the page
    while the model loads, even when a warm weights cache makes loading take only a couple of seconds.
    """
    if EXTERNAL_URL:
        yield Server(EXTERNAL_URL.rstrip("/") + "/", None, None)
        return
    tmp = tmp_path_factory.mktemp("webui_server")
    port = _free_port()
    log_path = tmp / "server.log"
    log = log_path.open("wb")
    # A warm page (renderer started) waits to open the URL the moment the port answers.
    early_ctx = browser.new_context(viewport={"width": 1280, "height": 860}, color_scheme="light")
    early_ctx.add_init_script(STATUS_RECORDER_JS)
    early_page = early_ctx.new_page()
    early_page.goto("about:blank")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "inf_llm.serve",
            "--config",
            str(CONFIG),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            f"model.weights_cache_dir={tmp / 'converted'}",
            f"contexts.dir={tmp / 'contexts'}",
        ],
        cwd=REPO_ROOT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    srv = Server(f"http://127.0.0.1:{port}/", proc, log_path)
    try:
        deadline = time.monotonic() + PORT_TIMEOUT_S
        while (first := get_status(srv.base_url)) is None:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{srv.log_tail()}")
            if time.monotonic() > deadline:
                pytest.fail(f"server port did not answer within {PORT_TIMEOUT_S} s:\n{srv.log_tail()}")
            time.sleep(0.02)
        srv.first_state = first[1].get("state")
        early_page.goto(srv.base_url)
        srv.early_page = early_page
        yield srv
    finally:
        early_ctx.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        log.close()
        shutil.rmtree(tmp / "converted", ignore_errors=True)


@pytest.fixture(scope="session")
def ready_server(server: Server) -> Server:
    server.wait_ready()
    return server


# ------------------------------------------------------------------------------------------ browser


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """The session's one Chromium (one Playwright driver per thread: a second one cannot start beside it)."""
    playwright_sync = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed")
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


class PageErrors:
    """Uncaught page exceptions and Content-Security-Policy violations seen by a page."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def watch(self, page: Page) -> None:
        page.on("pageerror", lambda e: self.items.append(f"pageerror: {e}"))
        page.on(
            "console",
            lambda m: (
                self.items.append(f"console: {m.text}")
                if m.type == "error" and "Content Security Policy" in m.text
                else None
            ),
        )


def _new_page(browser: Browser, errors: PageErrors, **context_args) -> tuple[BrowserContext, Page]:
    ctx = browser.new_context(accept_downloads=True, permissions=["clipboard-read", "clipboard-write"], **context_args)
    ctx.set_default_timeout(15_000)
    page = ctx.new_page()
    errors.watch(page)
    return ctx, page


@pytest.fixture
def page_errors() -> Iterator[PageErrors]:
    errors = PageErrors()
    yield errors
    assert not errors.items, "\n".join(errors.items)


@pytest.fixture
def page(browser: Browser, ready_server: Server, page_errors: PageErrors) -> Iterator[Page]:
    """A fresh browser profile (empty storage) on the ready server, desktop size, light theme."""
    ctx, pg = _new_page(browser, page_errors, viewport={"width": 1280, "height": 860}, color_scheme="light")
    open_ready(pg, ready_server.base_url)
    yield pg
    ctx.close()


# ------------------------------------------------------------------------------------------ helpers


def open_ready(page: Page, url: str) -> None:
    from playwright.sync_api import expect

    page.goto(url)
    expect(page.locator("#loading-screen")).to_be_hidden(timeout=READY_TIMEOUT_S * 1000)
    expect(page.locator("#status-dot")).to_have_attribute("data-state", "ready")
