"""End-to-end tests of the web chat page (inf_llm/static) in real headless Chromium against the real server.

The session's Chromium and server come from tests/webui_session.py (the server starts while Chromium is up,
so the first test sees the page while the model loads). Generation uses temperature 0 and few new tokens to
stay fast. Screenshots (light, dark, phone) go to artifacts/screenshots/.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

pytest.importorskip("playwright.sync_api")
from playwright.sync_api import Browser, Page, expect

from tests.webui_session import (
    CHROMIUM,
    EXTERNAL_URL,
    STATUS_RECORDER_JS,
    PageErrors,
    Server,
    _new_page,
    get_status,
    open_ready,
)

# One short reply of SmolLM2-135M on CPU takes a few seconds; a long prefill a few more.
REPLY_TIMEOUT_MS = 90_000
XSS_IMG = "<img src=x onerror=window.__xss=1>"
XSS_SCRIPT = "<script>window.__xss=1</script>"

if not EXTERNAL_URL and importlib.util.find_spec("inf_llm.serve") is None:
    pytest.skip("inf_llm.serve (the server) is not available", allow_module_level=True)
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} not installed", allow_module_level=True)


def configure(page: Page, *, temperature: float = 0, max_new_tokens: int = 24, repetition_penalty: float = 1.0) -> None:
    """Sets sampling through the settings dialog (stored in localStorage for later reloads).

    Repetition penalty 1.0: the served default (1.1) also penalizes the prompt's tokens, so the small model
    will not copy a fact out of an attached document.
    """
    page.get_by_role("button", name="Settings", exact=True).click()
    dialog = page.locator("#settings-dialog")
    expect(dialog).to_be_visible()
    dialog.locator("#set-temperature").fill(str(temperature))
    dialog.locator("#set-max_new_tokens").fill(str(max_new_tokens))
    dialog.locator("#set-repetition_penalty").fill(str(repetition_penalty))
    dialog.get_by_role("button", name="Done").click()
    expect(dialog).to_be_hidden()


def last_reply(page: Page):
    return page.locator("#thread .msg.assistant").last


def send(page: Page, text: str) -> None:
    page.locator("#input").fill(text)
    page.locator("#input").press("Enter")


def wait_reply(page: Page) -> str:
    """Waits for the last reply to finish; returns its rendered text."""
    reply = last_reply(page)
    expect(reply).to_have_attribute("aria-busy", "false", timeout=REPLY_TIMEOUT_MS)
    expect(page.locator("#send-btn")).to_be_visible()
    return reply.locator(".md").inner_text()


def chat_body(request) -> dict:
    return json.loads(request.post_data)


def watch_streaming(page: Page) -> None:
    """Records the length of the last reply's text at every DOM change (to prove it grew incrementally)."""
    page.evaluate(
        """() => {
            window.__lens = [];
            const thread = document.getElementById('thread');
            new MutationObserver(() => {
                const md = [...thread.querySelectorAll('.msg.assistant .md')].pop();
                if (md) window.__lens.push(md.textContent.length);
            }).observe(thread, {subtree: true, childList: true, characterData: true});
        }"""
    )


# -------------------------------------------------------------------------------------------- tests


def test_loading_screen_then_ready(browser: Browser, server: Server, page_errors: PageErrors, screenshots: Path):
    """While the model loads the page shows the loading screen with progress; then the chat, model and memory."""
    ctx = None
    page = server.early_page
    if page is None:  # an external server: open the page now (it may be ready already)
        ctx, page = _new_page(browser, page_errors, viewport={"width": 1280, "height": 860}, color_scheme="light")
        ctx.add_init_script(STATUS_RECORDER_JS)
        page.goto(server.base_url)
    else:
        page_errors.watch(page)
    if page.locator("#status-dot[data-state='loading']").count():
        page.screenshot(path=screenshots / "loading-light.png")
    status = server.wait_ready()
    screen = page.locator("#loading-screen")
    expect(screen).to_be_hidden(timeout=15_000)
    expect(page.locator("#status-dot")).to_have_attribute("data-state", "ready")
    seen = page.evaluate("() => window.__seen")
    if server.first_state == "loading":
        loading = [s for s in seen if s["state"] == "loading"]
        assert loading, f"the page never showed the server loading: {seen}"
        assert all(s["screen"] and s["bar"] and "Loading the model" in s["title"] for s in loading), loading
    assert seen[-1]["state"] == "ready" and not seen[-1]["screen"], seen
    expect(page.locator("#banner")).to_be_hidden()
    # The model name and the context-memory settings are visible.
    expect(page.locator("#model-name")).to_have_text(status["model"].split("/")[-1])
    expect(page.locator("#empty-facts")).to_contain_text("Memory")
    if status.get("type") == "inf-llm":
        expect(page.locator("#model-memory")).to_contain_text("InfLLM")
        mem = status["memory"]
        page.locator("#model-chip").click()
        info = page.locator("#memory-info")
        expect(info).to_contain_text("n_local")
        expect(info).to_contain_text(f"{mem['n_local']:,}")
        page.keyboard.press("Escape")
    page.locator("#input").focus()
    page.screenshot(path=screenshots / "ready-light.png")
    if ctx is not None:
        ctx.close()


def test_send_message_streams_reply(page: Page, ready_server: Server):
    configure(page, max_new_tokens=24)
    watch_streaming(page)
    with page.expect_request("**/chat") as req_info:
        send(page, "Say hello to me in one short sentence.")
    body = chat_body(req_info.value)
    assert body["prompt"] == "Say hello to me in one short sentence."
    assert body["history"] == []
    # The page sends only what differs from the server's defaults; the server fills in the rest.
    defaults = get_status(ready_server.base_url)[1]["generation_defaults"]
    sampling = {**defaults, **body}
    assert (sampling["temperature"], sampling["max_new_tokens"], sampling["repetition_penalty"]) == (0, 24, 1.0)
    assert body["session_id"]
    # The stop button replaces send while the reply streams.
    expect(page.locator("#stop-btn")).to_be_visible()
    text = wait_reply(page)
    assert text.strip()
    lens = [n for n in page.evaluate("() => window.__lens") if n > 0]
    assert len(set(lens)) >= 2, f"the reply did not grow incrementally: {lens}"
    stats = last_reply(page).locator(".stats")
    expect(stats).to_contain_text("prompt")
    expect(stats).to_contain_text("TTFT")
    expect(stats).to_contain_text("decode tok/s")
    expect(page.locator("#conv-list .conv-item")).to_have_count(1)

    # A follow-up sends the first turn as history (and the server can reuse its memory state).
    with page.expect_request("**/chat") as req_info:
        send(page, "Thanks!")
    body = chat_body(req_info.value)
    assert body["history"][0] == {"role": "user", "content": "Say hello to me in one short sentence."}
    assert body["history"][1]["role"] == "assistant" and body["history"][1]["content"].strip()
    wait_reply(page)
    stats = last_reply(page).locator(".stats")
    expect(stats).to_contain_text("cached")
    # Its prefill rate is over the few new tokens only, and the label says so (it read as a slow prefill).
    expect(stats).to_contain_text(re.compile(r"prefill tok/s · \d+ new"))
    expect(page.locator("#thread .msg.assistant").first.locator(".stats")).not_to_contain_text("new")


def test_settings_are_checked_before_they_are_saved(page: Page):
    """Regression: max_new_tokens=0 was stored as typed, Esc kept it, and the next reply failed. An invalid value
    is marked on its field and never stored; closing the dialog puts the stored value back and says so."""
    configure(page, max_new_tokens=12)
    limit = get_status(page.url)[1]["limits"]["max_new_tokens_limit"]
    page.get_by_role("button", name="Settings", exact=True).click()
    field = page.locator("#set-max_new_tokens")
    for bad in ("0", "2.5", str(limit + 1)):
        field.fill(bad)
        expect(field).to_have_attribute("aria-invalid", "true")
        expect(page.locator("#set-max_new_tokens-error")).to_be_visible()
        stored = json.loads(page.evaluate("() => localStorage.getItem('inf_llm.settings')"))
        assert stored["max_new_tokens"] == 12, stored
    page.keyboard.press("Escape")
    expect(page.locator("#settings-dialog")).to_be_hidden()
    expect(page.locator("#toast")).to_contain_text("Not saved (invalid): Max new tokens")
    page.get_by_role("button", name="Settings", exact=True).click()
    expect(field).to_have_value("12")
    expect(field).not_to_have_attribute("aria-invalid", "true")
    page.locator("#set-top_k").fill("-1")
    expect(page.locator("#set-top_k")).to_have_attribute("aria-invalid", "true")
    page.locator("#set-top_k").fill("5")
    expect(page.locator("#set-top_k")).not_to_have_attribute("aria-invalid", "true")
    page.get_by_role("button", name="Done").click()
    with page.expect_request("**/chat") as req_info:
        send(page, "Say OK.")
    body = chat_body(req_info.value)
    assert (body["max_new_tokens"], body["top_k"]) == (12, 5)
    assert wait_reply(page).strip()


def test_settings_form_is_built_from_status(page: Page):
    """The page has no list of sampling fields: a field /status's generation_fields adds (here by rewriting the
    answer) is in the form with its label and bounds, checked by the browser, and sent with the next message."""

    def with_min_p(route) -> None:
        body = route.fetch().json()
        if "generation_fields" in body:
            body["generation_fields"].append(
                {
                    "name": "min_p",
                    "type": "number",
                    "nullable": False,
                    "default": 0.0,
                    "description": "test",
                    "minimum": 0,
                    "maximum": 1,
                    "page": {"label": "Min p", "widget": "number", "step": 0.01, "order": 6},
                }
            )
            body["generation_defaults"]["min_p"] = 0.0
        route.fulfill(json=body)

    page.route("**/status", with_min_p)
    open_ready(page, page.url)
    page.get_by_role("button", name="Settings", exact=True).click()
    field = page.locator("#set-min_p")
    expect(field).to_have_attribute("aria-label", "Min p")
    assert (field.get_attribute("min"), field.get_attribute("max"), field.get_attribute("step")) == ("0", "1", "0.01")
    field.fill("1.5")
    expect(field).to_have_attribute("aria-invalid", "true")
    field.fill("0.1")
    expect(field).not_to_have_attribute("aria-invalid", "true")
    page.get_by_role("button", name="Done").click()
    page.route("**/chat", lambda route: route.abort())  # the real server has no min_p: only the body matters
    with page.expect_request("**/chat") as req_info:
        send(page, "Say OK.")
    assert chat_body(req_info.value)["min_p"] == 0.1


def test_importing_twice_keeps_one_copy(page: Page, tmp_path: Path):
    """Regression: importing the same export twice duplicated every conversation. Import goes by conversation id:
    the same file again changes nothing (and says so); a later copy of a conversation replaces it."""
    conv = {
        "id": "dedupe-demo",
        "title": "Colours",
        "created": 1,
        "updated": 2,
        "messages": [
            {"id": "u1", "role": "user", "content": "Name a colour."},
            {"id": "a1", "role": "assistant", "content": "Blue."},
        ],
    }
    path = tmp_path / "export.json"
    path.write_text(json.dumps({"format": "inf_llm.conversations", "version": 1, "conversations": [conv]}))
    page.locator("#import-input").set_input_files(str(path))
    expect(page.locator("#toast")).to_contain_text("Imported 1 conversation")
    page.locator("#import-input").set_input_files(str(path))
    expect(page.locator("#toast")).to_contain_text("Imported 0 conversations, 1 already here")
    expect(page.locator("#conv-list .conv-item")).to_have_count(1)
    later = {
        **conv,
        "title": "Colours, continued",
        "updated": 3,
        "messages": conv["messages"] + [{"id": "u2", "role": "user", "content": "Another?"}],
    }
    path.write_text(json.dumps({"format": "inf_llm.conversations", "version": 1, "conversations": [later]}))
    page.locator("#import-input").set_input_files(str(path))
    expect(page.locator("#toast")).to_contain_text("Imported 0 conversations, updated 1")
    expect(page.locator("#conv-list .conv-item")).to_have_count(1)
    expect(page.locator("#conv-list .conv-item")).to_contain_text("Colours, continued")
    page.reload()
    open_ready(page, page.url)
    expect(page.locator("#conv-list .conv-item")).to_have_count(1)


def test_model_dialog_names_the_device_it_runs_on(page: Page, ready_server: Server):
    """Regression: on a CPU server the dialog said "Blocks cached on the GPU"."""
    status = get_status(ready_server.base_url)[1]
    page.locator("#model-chip").click()
    info = page.locator("#memory-info")
    expect(info).to_contain_text("max_cached_block")
    if status["device"].startswith("cuda"):
        expect(info).to_contain_text("Blocks cached on the GPU")
    else:
        expect(info).not_to_contain_text("GPU")
        expect(info).to_contain_text("on a CPU every block stays in RAM")
    expect(page.locator("#model-info")).to_contain_text(status["device"])
    page.keyboard.press("Escape")


def test_stop_mid_reply(page: Page):
    configure(page, max_new_tokens=400)
    send(page, "Write a very long story about a dragon who learns to read, with many chapters.")
    reply = last_reply(page)
    expect(reply.locator(".md")).not_to_be_empty(timeout=REPLY_TIMEOUT_MS)
    expect(reply).to_have_attribute("aria-busy", "true")
    page.keyboard.press("Escape")  # Esc stops, like the stop button
    expect(reply).to_have_attribute("aria-busy", "false", timeout=10_000)
    expect(page.locator("#stop-btn")).to_be_hidden()
    expect(reply.locator(".msg-note")).to_contain_text("Stopped")
    stopped = reply.locator(".md").inner_text()
    page.wait_for_timeout(700)
    assert reply.locator(".md").inner_text() == stopped, "text kept arriving after stop"

    # The server is free again: the next message is answered at once.
    configure(page, max_new_tokens=8)
    send(page, "Say OK.")
    assert wait_reply(page).strip()
    expect(last_reply(page).locator(".msg-note")).not_to_contain_text("Stopped")

    # Regenerate replaces the last reply with a new one.
    last_reply(page).get_by_role("button", name="Regenerate reply").click()
    assert wait_reply(page).strip()
    expect(page.locator("#thread .msg")).to_have_count(4)


def test_reload_keeps_conversation(page: Page):
    configure(page, max_new_tokens=12)
    send(page, "My favourite fruit is mango. Reply with one word.")
    reply_text = wait_reply(page)
    page.reload()
    open_ready(page, page.url)
    item = page.locator("#conv-list .conv-item")
    expect(item).to_have_count(1)
    expect(item).to_contain_text("My favourite fruit is mango")
    expect(page.locator("#thread .msg.user")).to_contain_text("My favourite fruit is mango")
    expect(last_reply(page).locator(".md")).to_have_text(reply_text.strip())

    # A new chat, then back to the old one from the sidebar.
    page.get_by_role("button", name="New chat").click()
    expect(page.locator("#thread .msg")).to_have_count(0)
    page.locator("#conv-list .conv-open").first.click()
    expect(page.locator("#thread .msg")).to_have_count(2)

    # Edit and resend the user message: the conversation is cut after it and answered again.
    page.locator("#thread .msg.user").hover()
    page.get_by_role("button", name="Edit and resend").click()
    page.locator(".edit-input").fill("My favourite fruit is papaya. Reply with one word.")
    with page.expect_request("**/chat") as req_info:
        page.locator(".edit-input").press("Enter")
    assert "papaya" in chat_body(req_info.value)["prompt"]
    wait_reply(page)
    expect(page.locator("#thread .msg")).to_have_count(2)
    expect(page.locator("#thread .msg.user")).to_contain_text("papaya")


def test_attach_file_and_ask(page: Page, screenshots: Path):
    configure(page, max_new_tokens=24)
    doc = "The secret code is 4172.\n"
    page.locator("#file-input").set_input_files(
        files=[{"name": "secret.txt", "mimeType": "text/plain", "buffer": doc.encode()}]
    )
    chip = page.locator("#attachments .chip")
    expect(chip).to_contain_text("secret.txt")
    expect(chip).to_contain_text(re.compile(r"\d+ tokens"))  # counted by the server's /tokenize
    with page.expect_request("**/chat") as req_info:
        send(page, "What is the secret code?")
    body = chat_body(req_info.value)
    assert "The secret code is 4172" in body["prompt"]
    assert "What is the secret code?" in body["prompt"]
    expect(page.locator("#attachments .chip")).to_have_count(0)
    reply = wait_reply(page)
    assert reply.strip()
    # The attachment stays with the message, and opens in the document view.
    msg_chip = page.locator("#thread .msg.user .chip")
    expect(msg_chip).to_contain_text("secret.txt")
    # SmolLM2-135M at temperature 0 copies a code it was just given.
    assert "4172" in reply
    last_reply(page).get_by_role("button", name="Copy reply").click()
    assert "4172" in page.evaluate("() => navigator.clipboard.readText()")
    page.screenshot(path=screenshots / "chat-light.png")
    msg_chip.locator(".chip-open").click()
    expect(page.locator("#doc-text")).to_have_text(doc)
    page.keyboard.press("Escape")

    # Drag and drop a file anywhere on the page.
    page.evaluate(
        """() => {
            const dt = new DataTransfer();
            dt.items.add(new File(['dropped file text'], 'dropped.md', {type: 'text/markdown'}));
            window.dispatchEvent(new DragEvent('dragenter', {dataTransfer: dt}));
            window.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, cancelable: true}));
        }"""
    )
    expect(page.locator("#attachments .chip")).to_contain_text("dropped.md")
    expect(page.locator("#drop-overlay")).to_be_hidden()
    # A long paste becomes an attachment chip instead of filling the input.
    page.locator("#input").focus()
    page.evaluate(
        """() => {
            const dt = new DataTransfer();
            dt.setData('text/plain', 'long pasted line\\n'.repeat(300));
            document.getElementById('input').dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true, cancelable: true}));
        }"""
    )
    expect(page.locator("#attachments .chip")).to_have_count(2)
    expect(page.locator("#attachments")).to_contain_text("Pasted text")
    expect(page.locator("#input")).to_have_value("")
    page.get_by_role("button", name="Remove dropped.md").click()
    expect(page.locator("#attachments .chip")).to_have_count(1)


def test_html_in_messages_renders_as_text(page: Page):
    configure(page, max_new_tokens=24)
    payload = f"Repeat exactly: {XSS_IMG} {XSS_SCRIPT}"
    send(page, payload)
    wait_reply(page)
    user = page.locator("#thread .msg.user .user-text")
    expect(user).to_have_text(payload)
    thread = page.locator("#thread")
    assert thread.locator("img").count() == 0
    assert thread.locator("script").count() == 0
    assert page.evaluate("() => window.__xss") is None

    # The reply renderer, fed the payloads directly (the small model may not repeat them exactly), plus
    # a javascript: link and raw HTML blocks.
    reply_md = (
        f"Inline {XSS_IMG} and\n\n{XSS_SCRIPT}\n\n<iframe src=javascript:window.__xss=1></iframe>\n\n"
        "[click](javascript:window.__xss=1) ![pic](x onerror=window.__xss=1)\n\n"
        "```html\n<img src=x onerror=window.__xss=1>\n```\n"
    )
    result = page.evaluate(
        """async (md) => {
            const { renderMarkdown } = await import(new URL('static/js/markdown.js', location.href).href);
            const box = document.createElement('div');
            box.className = 'md';
            box.innerHTML = renderMarkdown(md);
            document.getElementById('thread').append(box);
            await new Promise((r) => setTimeout(r, 300));
            return {
                html: box.innerHTML,
                text: box.textContent,
                dangerous: box.querySelectorAll('img, script, iframe, [onerror], a[href^="javascript"]').length,
            };
        }""",
        reply_md,
    )
    assert result["dangerous"] == 0, result["html"]
    assert XSS_IMG in result["text"] and XSS_SCRIPT in result["text"]
    # The code block's copy button copies the code as text.
    page.locator("#thread > .md .code-copy").click()
    assert page.evaluate("() => navigator.clipboard.readText()") == XSS_IMG
    assert page.evaluate("() => window.__xss") is None


def test_export_then_import(page: Page, tmp_path: Path):
    configure(page, max_new_tokens=12)
    send(page, "Name a colour.")
    reply = wait_reply(page)
    item = page.locator("#conv-list .conv-item").first
    with page.expect_download() as dl_info:
        item.get_by_role("button", name=re.compile("^Export")).click()
    path = tmp_path / "export.json"
    dl_info.value.save_as(path)
    data = json.loads(path.read_text())
    assert data["format"] == "inf_llm.conversations"
    (conv,) = data["conversations"]
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant"]
    assert conv["messages"][0]["content"] == "Name a colour."
    assert conv["messages"][1]["done"]["usage"]["completion_tokens"] > 0

    # Delete it, then bring it back from the file.
    item.get_by_role("button", name=re.compile("^Delete")).click()
    page.locator("#confirm-ok").click()
    expect(page.locator("#conv-list .conv-item")).to_have_count(0)
    expect(page.locator("#thread .msg")).to_have_count(0)
    page.locator("#import-input").set_input_files(str(path))
    expect(page.locator("#toast")).to_contain_text("Imported 1 conversation")
    expect(page.locator("#conv-list .conv-item")).to_have_count(1)
    expect(page.locator("#thread .msg.user")).to_have_text("Name a colour.")
    expect(last_reply(page).locator(".md")).to_have_text(reply.strip())

    # Rename survives a reload.
    item = page.locator("#conv-list .conv-item").first
    item.get_by_role("button", name=re.compile("^Rename")).click()
    page.locator(".rename-input").fill("Colours")
    page.locator(".rename-input").press("Enter")
    expect(page.locator("#conv-title")).to_have_text("Colours")
    page.reload()
    open_ready(page, page.url)
    expect(page.locator("#conv-list .conv-item")).to_contain_text("Colours")


def _rooms_document(n_facts: int) -> str:
    colours = ("red", "green", "blue", "amber")
    lines = [f"Fact {i}: the lamp in room {i} is painted {colours[i % 4]}." for i in range(n_facts)]
    lines.insert(n_facts // 3, "Important: the vault password is SWORDFISH-88.")
    return "\n".join(lines) + "\n"


def test_memory_inspector_highlights_retrieved_spans(page: Page, screenshots: Path, tmp_path: Path):
    """The inspector maps `done.retrieval.spans` (decoded prompt text, chat-template markers and partial words
    included) back onto the attached document. The reply is imported in the server's `done` shape, so this
    runs without a multi-thousand-token prefill (test_memory_inspector_on_long_document does it for real)."""
    doc = _rooms_document(130)
    question = "What is the vault password?"
    # The prompt as the server decodes it: ChatML around the page's document wrapper.
    prompt = f'<|im_start|>user\nDocument: rooms.txt\n"""\n{doc}"""\n\nQuestion: {question}<|im_end|>\n'
    needle = prompt.index("Important:")
    spans = [
        {"token_start": 0, "token_end": 128, "text": prompt[: prompt.index("Fact 3:") + 11], "score": 0.25},
        {"token_start": 384, "token_end": 512, "text": prompt[needle - 30 : needle + 90], "score": 1.0},
        {
            "token_start": 1024,
            "token_end": 1152,
            "text": prompt[prompt.index("Fact 90:") + 3 : prompt.index("Fact 93:")],
            "score": 0.5,
        },
        {"token_start": 2200, "token_end": 2214, "text": "<|im_start|>assistant\n", "score": 0.1},
    ]
    conv = {
        "id": "inspector-demo",
        "title": "Vault password",
        "created": 1,
        "updated": 2,
        "messages": [
            {
                "id": "u1",
                "role": "user",
                "content": question,
                "attachments": [{"name": "rooms.txt", "text": doc, "tokens": 2265}],
            },
            {
                "id": "a1",
                "role": "assistant",
                "content": "The vault password is **SWORDFISH-88**.",
                "done": {
                    "finish_reason": "stop",
                    "usage": {"prompt_tokens": 2314, "completion_tokens": 12, "total_tokens": 2326, "cached_tokens": 0},
                    "timings": {
                        "ttft_ms": 4980.0,
                        "prefill_ms": 4980.0,
                        "prefill_tokens_per_s": 464.7,
                        "decode_ms": 540.0,
                        "decode_tokens_per_s": 22.2,
                    },
                    "truncated": None,
                    "retrieval": {"layers": 30, "steps": 12, "spans": spans},
                },
            },
        ],
    }
    path = tmp_path / "inspector.json"
    path.write_text(json.dumps({"format": "inf_llm.conversations", "version": 1, "conversations": [conv]}))
    page.locator("#import-input").set_input_files(str(path))
    expect(last_reply(page).locator(".md strong")).to_have_text("SWORDFISH-88")
    stats = last_reply(page).locator(".stats")
    expect(stats).to_contain_text("2,314")
    expect(stats).to_contain_text("465")
    last_reply(page).get_by_role("button", name=re.compile("memory inspector")).click()
    expect(page.locator("#inspector-dialog")).to_be_visible()
    expect(page.locator("#inspector-sub")).to_contain_text("30 layers · 12 decode steps · 4 retrieved passages")
    passages = page.locator("#passage-list .passage")
    expect(passages).to_have_count(4)
    expect(passages.first).to_contain_text("100% of lookups")
    expect(passages.first).to_contain_text("SWORDFISH-88")
    # Three spans hold document text; the last is only a template marker and is listed but not located.
    expect(page.locator("#passage-list .passage:disabled")).to_have_count(1)
    doc_view = page.locator("#doc-view")
    marked = "".join(doc_view.locator("mark.heat").all_text_contents())
    assert "Important: the vault password is SWORDFISH-88." in marked
    assert "Fact 0: the lamp in room 0" in marked  # after the template markers and the page's wrapper
    assert "lamp in room 91 is painted" in marked  # a span starting mid-word
    assert "Fact 120" not in marked
    strongest = doc_view.locator("mark.heat", has_text="SWORDFISH").first
    assert strongest.evaluate("(m) => getComputedStyle(m).getPropertyValue('--heat').trim()") == "1.000"
    passages.first.click()
    expect(doc_view.locator("mark.flash").first).to_be_in_viewport()
    page.screenshot(path=screenshots / "inspector-light.png")
    page.keyboard.press("Escape")
    expect(page.locator("#inspector-dialog")).to_be_hidden()


@pytest.mark.slow
def test_memory_inspector_on_long_document(page: Page, screenshots: Path):
    """For real: a document longer than n_init + n_local, prefill progress, then the retrieved passages."""
    configure(page, max_new_tokens=12)
    page.locator("#file-input").set_input_files(
        files=[{"name": "rooms.txt", "mimeType": "text/plain", "buffer": _rooms_document(130).encode()}]
    )
    expect(page.locator("#attachments .chip")).to_contain_text(re.compile(r"\d+ tokens"))
    send(page, "What is the vault password?")
    expect(last_reply(page).locator(".prefill")).to_be_visible(timeout=REPLY_TIMEOUT_MS)
    expect(last_reply(page).locator(".prefill")).to_contain_text("Reading the prompt")
    reply = last_reply(page)
    expect(reply).to_have_attribute("aria-busy", "false", timeout=300_000)
    assert "SWORDFISH-88" in reply.locator(".md").inner_text()
    reply.get_by_role("button", name=re.compile("memory inspector")).click()
    expect(page.locator("#inspector-dialog")).to_be_visible()
    assert page.locator("#passage-list .passage").count() > 0
    assert page.locator("#doc-view mark.heat").count() > 0, "no retrieved span was located in the document"
    page.locator("#passage-list .passage:not([disabled])").first.click()
    page.screenshot(path=screenshots / "inspector-real-light.png")
    page.keyboard.press("Escape")


@pytest.mark.parametrize(
    "name,context_args",
    [
        ("dark", {"viewport": {"width": 1280, "height": 860}, "color_scheme": "dark"}),
        (
            "phone",
            {
                "viewport": {"width": 390, "height": 844},
                "device_scale_factor": 2,
                "is_mobile": True,
                "has_touch": True,
                "color_scheme": "light",
            },
        ),
    ],
)
def test_screenshots_dark_and_phone(
    browser: Browser, ready_server: Server, page_errors: PageErrors, screenshots: Path, name, context_args
):
    ctx, page = _new_page(browser, page_errors, **context_args)
    open_ready(page, ready_server.base_url)
    page.screenshot(path=screenshots / f"empty-{name}.png")
    configure(page, max_new_tokens=40)
    page.locator("#file-input").set_input_files(
        files=[
            {
                "name": "notes.md",
                "mimeType": "text/markdown",
                "buffer": b"# Notes\nThe meeting is on Tuesday at 10:00 in room 4.\n",
            }
        ]
    )
    expect(page.locator("#attachments .chip")).to_contain_text(re.compile(r"\d+ tokens"))
    send(page, "Write a Python function that adds two numbers.")
    wait_reply(page)
    if name == "phone":
        # The sidebar is a drawer on a phone.
        expect(page.locator("#menu-btn")).to_be_visible()
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
    page.screenshot(path=screenshots / f"chat-{name}.png")
    if name == "phone":
        page.locator("#menu-btn").click()
        expect(page.locator("#sidebar")).to_be_in_viewport()
        page.wait_for_timeout(300)  # the drawer slides in
        page.screenshot(path=screenshots / "sidebar-phone.png")
        page.locator("#sidebar-close").click()
    page.get_by_role("button", name="Settings", exact=True).click()
    page.screenshot(path=screenshots / f"settings-{name}.png")
    page.keyboard.press("Escape")
    ctx.close()
