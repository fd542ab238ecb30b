"""End-to-end tests of the page's documents panel (inf_llm/static/js/documents.js) in real headless Chromium.

The session's Chromium and real server (`python -m inf_llm.serve`, SmolLM2-135M on CPU, documents in a
session folder) from tests/webui_session.py, or INF_LLM_WEBUI_URL. Each test deletes the documents it made
and (but for the screenshots) names them uniquely, so it also runs against a server whose library holds
documents of its own.

Screenshots of the panel go to artifacts/screenshots/; with INF_LLM_DOC_FIGURES=1 also to docs/figures/
(page-documents-light.png, -dark.png, -phone.png), the figures the docs show.
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("playwright.sync_api")
from playwright.sync_api import Browser, Page, expect

from tests.test_webui import chat_body, configure, last_reply, send, wait_reply, watch_streaming
from tests.webui_session import REPO_ROOT, PageErrors, Server, _new_page, open_ready

DOC_FIGURES = REPO_ROOT / "docs" / "figures"
WRITE_DOC_FIGURES = os.environ.get("INF_LLM_DOC_FIGURES") == "1"
SECRET_DOC = "The secret code is 4172.\n"
PHONE = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True}
# Reading a document of a few thousand tokens takes a few seconds on 2 CPU cores.
READ_TIMEOUT_MS = 120_000


# --------------------------------------------------------------------------------------------- server


def api(base_url: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
    """(HTTP status, JSON body) of a request to the server's API."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        base_url + path, data=data, method=method, headers={"Content-Type": "application/json"} if data else {}
    )
    try:
        with urllib.request.urlopen(req, timeout=READ_TIMEOUT_MS / 1000) as res:
            return res.status, json.loads(res.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


class Library:
    """The server's documents as a test sees them: unique names, and the ones made here deleted at the end."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.tag = uuid.uuid4().hex[:8]
        self.before = {c["id"] for c in self.listed()}

    def name(self, stem: str) -> str:
        return f"{stem}-{self.tag}.txt"

    def listed(self) -> list[dict]:
        status, body = api(self.base_url, "GET", "v1/contexts")
        assert status == 200, body
        return body["data"]

    def find(self, name: str) -> dict | None:
        return next((c for c in self.listed() if c["name"] == name), None)

    def add(self, name: str, text: str) -> dict:
        """A document added through the API (not the page), for the tests of what comes after."""
        status, info = api(self.base_url, "POST", "v1/contexts", {"name": name, "text": text, "system": None})
        assert status == 201, info
        return info

    def clean(self) -> None:
        for c in self.listed():
            if c["id"] not in self.before:
                api(self.base_url, "DELETE", f"v1/contexts/{c['id']}")


@pytest.fixture
def library(ready_server: Server) -> Iterator[Library]:
    lib = Library(ready_server.base_url)
    yield lib
    lib.clean()


# -------------------------------------------------------------------------------------------- helpers


def open_panel(page: Page) -> None:
    if page.locator("#menu-btn").is_visible():  # a phone: the button is in the drawer
        page.locator("#menu-btn").click()
    page.locator("#documents-btn").click()
    expect(page.locator("#documents-dialog")).to_be_visible()
    expect(page.locator("#lib-empty")).not_to_have_text("Loading…")


def item(page: Page, name: str):
    return page.locator("#lib-list .lib-item", has_text=name)


def choose_file(page: Page, name: str, text: str) -> None:
    page.locator("#lib-file").set_input_files(files=[{"name": name, "mimeType": "text/plain", "buffer": text.encode()}])


def record_progress(page: Page) -> None:
    """Keeps every text the progress line showed (a read of a few seconds is over before a poll would see it)."""
    page.evaluate(
        """() => {
            window.__progress = [];
            const text = document.getElementById('lib-progress-text');
            new MutationObserver(() => window.__progress.push(text.textContent))
                .observe(text, {childList: true, characterData: true, subtree: true});
        }"""
    )


def rooms_document(n_facts: int) -> str:
    colours = ("red", "green", "blue", "amber")
    return "".join(f"Fact {i}: the lamp in room {i} is painted {colours[i % 4]}.\n" for i in range(n_facts))


# -------------------------------------------------------------------------------------------- tests


def test_upload_lists_document_with_its_tokens(page: Page, library: Library):
    """A chosen file fills in the name; adding it shows the server's reading progress, then the entry with the
    server's token count, its memory size and where it is kept."""
    open_panel(page)
    name = library.name("rooms")
    choose_file(page, name, rooms_document(200))
    expect(page.locator("#lib-name")).to_have_value(name)
    expect(page.locator("#lib-file-chip")).to_contain_text(name)
    record_progress(page)
    page.locator("#lib-add").click()
    expect(page.locator("#lib-progress")).to_be_visible()
    entry = item(page, name)
    expect(entry).to_be_visible(timeout=READ_TIMEOUT_MS)
    expect(page.locator("#lib-progress")).to_be_hidden()
    info = library.find(name)
    assert info is not None, "the page did not add the document"
    expect(entry.locator(".lib-tokens")).to_have_text(f"{info['tokens']:,} tokens")
    expect(entry.locator(".lib-bytes")).to_have_text(re.compile(r"^\d+(\.\d)? (B|KB|MB|GB)$"))
    for where in info["where"]:
        expect(entry.locator(f".badge[data-where='{where}']")).to_be_visible()
    seen = page.evaluate("() => window.__progress")
    assert any(re.search(r"Reading .* / [\d,]+ tokens \(\d+%\)", s) for s in seen), seen
    expect(page.locator("#toast")).to_contain_text(f'Added "{name}"')
    # The form is empty again, ready for the next one.
    expect(page.locator("#lib-name")).to_have_value("")
    expect(page.locator("#lib-file-chip")).to_be_hidden()

    # Pasted text with a name typed in, and the list after a reload of the page (refreshed on open).
    pasted = library.name("pasted")
    page.locator("#lib-text").fill(SECRET_DOC)
    page.locator("#lib-name").fill(pasted)
    page.locator("#lib-name").press("Enter")  # adds; does not close the panel
    expect(item(page, pasted)).to_be_visible(timeout=READ_TIMEOUT_MS)
    expect(page.locator("#documents-dialog")).to_be_visible()
    page.reload()
    open_ready(page, page.url)
    open_panel(page)
    expect(item(page, name)).to_be_visible()
    expect(item(page, pasted)).to_be_visible()


def test_chat_on_document_sends_context_id(page: Page, library: Library):
    """A "Start a chat" opens a conversation bound to the document: the header names it, and every /chat body
    (first message, regenerate, follow-up, after a reload) carries its context_id and not the document's text."""
    info = library.add(library.name("secret"), SECRET_DOC)
    configure(page, max_new_tokens=24)
    open_panel(page)
    item(page, info["name"]).get_by_role("button", name=f"Start a chat on {info['name']}").click()
    expect(page.locator("#documents-dialog")).to_be_hidden()
    chip = page.locator("#context-chip")
    expect(chip).to_be_visible()
    expect(chip).to_contain_text(info["name"])
    expect(page.locator("#empty-doc")).to_contain_text(f"Ask anything about {info['name']}")

    bodies = []
    page.on(
        "request", lambda r: bodies.append(chat_body(r)) if r.url.endswith("/chat") and r.method == "POST" else None
    )
    watch_streaming(page)
    send(page, "What is the secret code?")
    reply = wait_reply(page)
    assert reply.strip()
    lens = [n for n in page.evaluate("() => window.__lens") if n > 0]
    assert len(set(lens)) >= 2, f"the reply did not grow incrementally: {lens}"
    assert bodies[-1]["context_id"] == info["id"]
    assert bodies[-1]["prompt"] == "What is the secret code?"  # the server puts the document before it
    assert "4172" not in json.dumps(bodies[-1])
    # SmolLM2-135M at temperature 0 copies a code it was just given: the document reached the model.
    assert "4172" in reply

    last_reply(page).get_by_role("button", name="Regenerate reply").click()
    wait_reply(page)
    assert bodies[-1]["context_id"] == info["id"]
    send(page, "Thanks!")
    wait_reply(page)
    assert bodies[-1]["context_id"] == info["id"]
    assert bodies[-1]["history"][0] == {"role": "user", "content": "What is the secret code?"}

    page.reload()
    open_ready(page, page.url)
    expect(page.locator("#context-chip")).to_contain_text(info["name"])
    page.locator("#thread .msg.user").first.hover()
    page.get_by_role("button", name="Edit and resend").first.click()
    page.locator(".edit-input").fill("Tell me the secret code.")
    page.locator(".edit-input").press("Enter")
    wait_reply(page)
    assert bodies[-1]["context_id"] == info["id"]
    assert bodies[-1]["history"] == []


def test_delete_document_after_confirm(page: Page, library: Library):
    """Delete asks first; then the entry is gone from the list and the server. A conversation on it says so:
    its header chip is struck out, and a message gets the server's answer (no such document) as its error."""
    info = library.add(library.name("old"), SECRET_DOC)
    open_panel(page)
    item(page, info["name"]).get_by_role("button", name=f"Start a chat on {info['name']}").click()
    page.locator("#context-chip").click()  # opens the panel, the conversation's document marked
    entry = item(page, info["name"])
    expect(entry).to_have_class(re.compile(r"\bcurrent\b"))
    entry.get_by_role("button", name=f"Delete {info['name']}").click()
    expect(page.locator("#confirm-dialog")).to_be_visible()
    page.locator("#confirm-dialog").get_by_role("button", name="Cancel").click()
    expect(entry).to_be_visible()
    entry.get_by_role("button", name=f"Delete {info['name']}").click()
    page.locator("#confirm-ok").click()
    expect(entry).to_have_count(0)
    expect(page.locator("#toast")).to_contain_text(f'Deleted "{info["name"]}"')
    assert library.find(info["name"]) is None

    page.keyboard.press("Escape")
    expect(page.locator("#context-chip")).to_have_attribute("data-missing", "true")
    with page.expect_response("**/chat") as res_info:
        send(page, "What is the secret code?")
    error = res_info.value.json()["error"]["message"]
    expect(last_reply(page)).to_have_attribute("aria-busy", "false")
    expect(last_reply(page).locator(".note-error")).to_contain_text(error)


def test_server_error_is_a_toast_naming_it(page: Page, library: Library):
    """A document the server refuses (400: nothing but blank lines) is reported with the server's own message,
    and the form keeps what was typed."""
    name = library.name("blank")
    open_panel(page)
    # The page only sends a document with some text: blank lines reach the server, which finds nothing in them.
    page.locator("#lib-text").fill("\n\n\n")
    page.locator("#lib-name").fill(name)
    with page.expect_response(lambda r: "/v1/contexts" in r.url and r.request.method == "POST") as res_info:
        page.locator("#lib-add").click()
    res = res_info.value
    assert res.status == 400, res.text()
    message = res.json()["error"]["message"]
    toast = page.locator("#toast")
    expect(toast).to_be_visible()
    expect(toast).to_have_attribute("data-kind", "error")
    expect(toast).to_contain_text(f'Could not add "{name}": {message}')
    expect(page.locator("#lib-name")).to_have_value(name)
    assert library.find(name) is None


def test_panel_fits_a_phone(browser: Browser, ready_server: Server, page_errors: PageErrors, library: Library):
    ctx, page = _new_page(browser, page_errors, color_scheme="light", **PHONE)
    open_ready(page, ready_server.base_url)
    library.add(library.name("a-document-with-a-rather-long-name-for-a-phone-screen"), SECRET_DOC)
    open_panel(page)
    expect(page.locator("#lib-list .lib-item").first).to_be_visible()
    widths = page.evaluate(
        """() => {
            const scroll = document.querySelector('#documents-dialog .sheet-scroll');
            const items = [...document.querySelectorAll('#lib-list .lib-item')];
            return {
                page: document.documentElement.scrollWidth,
                panel: [scroll.scrollWidth, scroll.clientWidth],
                right: Math.max(...items.map((li) => li.getBoundingClientRect().right)),
            };
        }"""
    )
    assert widths["page"] <= 390, widths
    assert widths["panel"][0] <= widths["panel"][1], widths
    assert widths["right"] <= 390, widths
    ctx.close()


@pytest.mark.parametrize(
    "name,context_args",
    [
        ("light", {"viewport": {"width": 1280, "height": 860}, "color_scheme": "light"}),
        ("dark", {"viewport": {"width": 1280, "height": 860}, "color_scheme": "dark"}),
        ("phone", {**PHONE, "color_scheme": "light"}),
    ],
)
def test_screenshots(
    browser: Browser,
    ready_server: Server,
    page_errors: PageErrors,
    library: Library,
    screenshots: Path,
    name: str,
    context_args: dict,
):
    """The panel with two documents, one just added; also the progress line while that one is read."""
    library.add("employee-handbook.txt", rooms_document(60))
    ctx, page = _new_page(browser, page_errors, **context_args)
    open_ready(page, ready_server.base_url)
    open_panel(page)
    choose_file(page, "meeting-notes.md", rooms_document(100))
    page.locator("#lib-add").click()
    expect(page.locator("#lib-progress")).to_be_visible()
    page.screenshot(path=screenshots / f"documents-reading-{name}.png")
    expect(page.locator("#lib-progress")).to_be_hidden(timeout=READ_TIMEOUT_MS)
    expect(item(page, "meeting-notes.md")).to_be_visible()
    page.wait_for_timeout(2800)  # the new entry's highlight and the toast are over (2.4 s, 2.6 s)
    paths = [screenshots / f"documents-{name}.png"]
    if WRITE_DOC_FIGURES:
        DOC_FIGURES.mkdir(parents=True, exist_ok=True)
        paths.append(DOC_FIGURES / f"page-documents-{name}.png")
    for path in paths:
        page.screenshot(path=path)
    ctx.close()
