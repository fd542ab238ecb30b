"""Document memories over HTTP (POST/GET/DELETE /v1/contexts, `context_id` on /chat and the OpenAI routes)
and prefix snapshots (regenerate, a new chat on the same document), against the real SmolLM2 server on
loopback: a document is read once, chats on it reuse its memory, it survives a restart, and what cannot be
kept is a clear error that loses nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
import torch

from inf_llm.engine.contexts import SPARE_TOKENS, ContextFolder, ContextInfo
from inf_llm.errors import ContextStorageError
from tests.test_server import API_KEY, AUTH, REQUEST_TIMEOUT, parse_sse, served

# ~1.3K tokens of varied prose with one fact to find.
DOCUMENT = " ".join(
    f"Chapter {i}. The {w} ferry left the harbour at {5 + i % 12} o'clock, carrying {20 + 7 * i} crates of "
    f"{f} to the island of {p}." for i, (w, f, p) in enumerate(
        [(w, f, p) for w in ("red", "green", "old", "slow", "small") for f in ("apples", "salt", "wool", "tin")
         for p in ("Arden", "Belmar", "Corvo")][:48])
) + " The lighthouse keeper's code word is HERON-42."
QUESTION = "What is the lighthouse keeper's code word?"
OVERRIDES = ["model.device=cpu", "generation.repetition_penalty=1.0", "generation.max_new_tokens=12",
             f"server.api_key={API_KEY}", "server.max_client_requests=16"]


@pytest.fixture(scope="module")
def contexts_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("contexts")


@pytest.fixture(scope="module")
def server(tmp_path_factory, contexts_dir):
    with served(tmp_path_factory.mktemp("ctx-server"), *OVERRIDES, f"contexts.dir={contexts_dir}") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=REQUEST_TIMEOUT) as c:
        yield c


@pytest.fixture(scope="module")
def document(client) -> dict:
    r = client.post("/v1/contexts", json={"name": "harbour.txt", "text": DOCUMENT})
    assert r.status_code == 201, r.text
    return r.json()


def ask(client, context_id: str | None, prompt: str = QUESTION, **kw) -> dict:
    body = {"prompt": prompt, "temperature": 0, "max_new_tokens": 12, **kw}
    if context_id is not None:
        body["context_id"] = context_id
    r = client.post("/chat?stream=false", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_document_is_read_once_listed_and_saved(client, document, contexts_dir):
    assert document["id"].startswith("ctx-") and document["object"] == "context"
    assert document["tokens"] > 1000 and document["bytes"] > 0 and document["disk_bytes"] > 0
    assert document["where"] == ["ram", "disk"] and document["disk_error"] is None
    listed = client.get("/v1/contexts").json()
    assert [c["id"] for c in listed["data"]] == [document["id"]]
    assert client.get(f"/v1/contexts/{document['id']}").json()["tokens"] == document["tokens"]
    assert (contexts_dir / f"{document['id']}.safetensors").is_file()


def test_a_documents_text_is_served_as_it_was_read(client, document):
    body = client.get(f"/v1/contexts/{document['id']}/text").json()
    assert body == {"id": document["id"], "object": "context.text", "name": "harbour.txt", "text": DOCUMENT}
    assert client.get("/v1/contexts/ctx-000000000000/text").status_code == 404


def test_chats_on_a_document_do_not_read_it_again(client, document):
    first = ask(client, document["id"])
    second = ask(client, document["id"], "Which island did the red ferry sail to first?")
    for answer in (first, second):
        assert answer["usage"]["cached_tokens"] >= document["tokens"]
    assert "HERON" in first["response"]
    # a regenerate (the same prompt again) continues from the snapshot at the end of its prefill
    again = ask(client, document["id"])
    assert again["usage"]["cached_tokens"] == again["usage"]["prompt_tokens"] - 1
    assert again["response"] == first["response"]


def test_the_openai_routes_take_context_id_as_an_extra_field(server, document):
    oai = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, timeout=REQUEST_TIMEOUT, max_retries=0)
    chat = oai.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": QUESTION}],
                                       temperature=0, max_tokens=12, extra_body={"context_id": document["id"]})
    assert chat.usage.prompt_tokens_details.cached_tokens >= document["tokens"]
    assert "HERON" in chat.choices[0].message.content
    for _ in range(2):  # raw completions on the document: the first keeps a snapshot at its end, the next reuses it
        text = oai.completions.create(model="SmolLM2-135M-Instruct", prompt="Q: the code word?\nA:", temperature=0,
                                      max_tokens=4, extra_body={"context_id": document["id"]})
    assert text.usage.prompt_tokens_details.cached_tokens > document["tokens"] // 2


def test_reading_streams_progress_then_the_context(client):
    with client.stream("POST", "/v1/contexts?stream=true", json={"name": "again.txt", "text": DOCUMENT * 2}) as r:
        assert r.status_code == 201
        events = parse_sse(r.iter_lines())
    names = [name for name, _ in events if name != "comment"]
    assert names[-1] == "context" and "progress" in names
    progress = [json.loads(d) for n, d in events if n == "progress"]
    assert progress[-1]["processed"] <= progress[-1]["total"]
    info = json.loads(events[-1][1])
    assert client.delete(f"/v1/contexts/{info['id']}").json() == {"id": info["id"], "object": "context.deleted",
                                                                  "deleted": True}
    assert client.get(f"/v1/contexts/{info['id']}").status_code == 404
    assert client.delete(f"/v1/contexts/{info['id']}").status_code == 404


@pytest.mark.parametrize("body,status,needle", [
    ({"name": "x", "text": ""}, 422, "text"),
    ({"name": "", "text": "hello"}, 422, "name"),
    ({"text": "hello"}, 422, "name"),
])
def test_bad_documents_are_refused_with_the_field_named(client, body, status, needle):
    r = client.post("/v1/contexts", json=body)
    assert r.status_code == status and needle in r.text


@pytest.mark.parametrize("context_id", ["ctx-000000000000", "../../etc/passwd", "ctx-zz"])
def test_an_unknown_or_malformed_context_id_is_a_404(client, context_id):
    assert client.get(f"/v1/contexts/{context_id}").status_code in (404,)
    r = client.post("/chat?stream=false", json={"prompt": "hi", "context_id": context_id, "max_new_tokens": 2})
    assert r.status_code == 404 and "no document memory" in r.text


def test_contexts_need_the_api_key(server):
    assert httpx.get(f"{server.url}/v1/contexts").status_code == 401
    assert httpx.post(f"{server.url}/v1/contexts", json={"name": "a", "text": "b"}).status_code == 401


def test_a_saved_document_answers_after_a_restart_and_a_damaged_file_is_refused(tmp_path):
    """Another server process on the same folder lists the document, answers from it as the first did
    (its memory loaded from disk, not read again); a damaged file is refused by name and nothing else is lost."""
    folder = tmp_path / "contexts"
    with served(tmp_path, *OVERRIDES, f"contexts.dir={folder}") as srv, \
            httpx.Client(base_url=srv.url, headers=AUTH, timeout=REQUEST_TIMEOUT) as c:
        doc = c.post("/v1/contexts", json={"name": "harbour.txt", "text": DOCUMENT}).json()
        before = ask(c, doc["id"])
        broken = c.post("/v1/contexts", json={"name": "broken.txt", "text": DOCUMENT[:2000]}).json()
    (folder / f"{broken['id']}.safetensors").write_bytes(b"not a safetensors file")
    with served(tmp_path, *OVERRIDES, f"contexts.dir={folder}") as srv, \
            httpx.Client(base_url=srv.url, headers=AUTH, timeout=REQUEST_TIMEOUT) as c:
        listed = {x["id"]: x for x in c.get("/v1/contexts").json()["data"]}
        assert listed[doc["id"]]["where"] == ["disk"] and broken["id"] not in listed
        assert c.get(f"/v1/contexts/{doc['id']}/text").json()["text"] == DOCUMENT
        after = ask(c, doc["id"])
        assert after["usage"]["cached_tokens"] >= doc["tokens"] and after["response"] == before["response"]
        assert c.get(f"/v1/contexts/{doc['id']}").json()["where"] == ["ram", "disk"]
        r = c.get(f"/v1/contexts/{broken['id']}")
        assert r.status_code == 507 and broken["id"] in r.text and "not a readable document memory" in r.text


def test_a_full_disk_budget_keeps_the_document_in_ram_and_says_why(tmp_path):
    with served(tmp_path, *OVERRIDES, f"contexts.dir={tmp_path / 'c'}", "contexts.disk_mib=1") as srv, \
            httpx.Client(base_url=srv.url, headers=AUTH, timeout=REQUEST_TIMEOUT) as c:
        doc = c.post("/v1/contexts", json={"name": "harbour.txt", "text": DOCUMENT}).json()
        assert doc["where"] == ["ram"] and "contexts.disk_mib" in doc["disk_error"]
        assert ask(c, doc["id"])["usage"]["cached_tokens"] >= doc["tokens"]


def test_a_full_ram_budget_moves_a_document_to_disk_and_it_comes_back(tmp_path):
    """contexts.ram_mib too small for a second memory: the next answer's snapshot pushes the document out of
    RAM (it stays listed, on disk), and the next question on it loads it back instead of reading it again."""
    with served(tmp_path, *OVERRIDES, f"contexts.dir={tmp_path / 'c'}", "contexts.ram_mib=1") as srv, \
            httpx.Client(base_url=srv.url, headers=AUTH, timeout=REQUEST_TIMEOUT) as c:
        doc = c.post("/v1/contexts", json={"name": "harbour.txt", "text": DOCUMENT}).json()
        assert doc["where"] == ["ram", "disk"]  # the newest memory stays, whatever the budget
        first = ask(c, doc["id"])
        ask(c, None, "Name a color.")  # another conversation's snapshots take the budget
        assert c.get(f"/v1/contexts/{doc['id']}").json()["where"] == ["disk"]
        again = ask(c, doc["id"])
        assert again["usage"]["cached_tokens"] >= doc["tokens"] and again["response"] == first["response"]


def _tiny_state(blocks: int, block_size: int = 4) -> dict:
    g = torch.Generator().manual_seed(0)
    kv = (blocks, 2, block_size, 8)  # (N, Hkv, block_size, D)
    layer = {"seen": blocks * block_size + 6, "rot_base": 2, "n_local": None,
             "init_k": torch.randn(2, 2, 8, generator=g), "init_v": torch.randn(2, 2, 8, generator=g),
             "tail": {"first_pos": blocks * block_size + 2, "k": torch.randn(2, 4, 8, generator=g),
                      "v": torch.randn(2, 4, 8, generator=g)},
             "store": {"k": torch.randn(kv, generator=g), "v": torch.randn(kv, generator=g),
                       "repr": torch.randn(blocks, 16, generator=g),
                       "start_pos": [2 + i * block_size for i in range(blocks)]}}
    return {"format": 1, "fingerprint": {"layers": 1}, "layers": [layer]}


def test_a_saved_memory_loads_as_views_of_its_file_with_room_to_grow(tmp_path):
    """The loaded store's tensors are views of the file's one mapping (nothing copied at load), hold the saved
    blocks then SPARE_TOKENS of unused rows, and writing into them leaves the file as it was."""
    folder = ContextFolder(tmp_path, 1 << 30, 8)
    state = _tiny_state(blocks=3)
    ids = list(range(state["layers"][0]["seen"]))
    info = ContextInfo("ctx-0123456789ab", "doc", None, len(ids), 0)
    size = folder.save(info, ids, state, "m", "text")
    before = folder.path(info.id).read_bytes()
    _, loaded_ids, loaded = folder.load(info.id, "m", {"layers": 1})
    store = loaded["layers"][0]["store"]
    assert loaded_ids == ids and store["start_pos"] == state["layers"][0]["store"]["start_pos"]
    assert store["k"].shape[0] == 3 + SPARE_TOKENS // 4
    assert torch.equal(store["k"][:3], state["layers"][0]["store"]["k"])
    assert store["k"].untyped_storage().nbytes() == size  # one mapping of the whole file
    assert store["k"].untyped_storage().data_ptr() == store["repr"].untyped_storage().data_ptr()
    store["k"][3:].fill_(1.0)  # a new block written into the room: private pages, not the file
    assert folder.path(info.id).read_bytes() == before
    assert folder.load_document(info.id)[2] == "text"


def test_a_truncated_memory_file_is_refused_as_damaged(tmp_path):
    folder = ContextFolder(tmp_path, 1 << 30, 8)
    state = _tiny_state(blocks=2)
    ids = list(range(state["layers"][0]["seen"]))
    info = ContextInfo("ctx-0123456789ab", "doc", None, len(ids), 0)
    folder.save(info, ids, state, "m", "text")
    path = folder.path(info.id)
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(ContextStorageError, match="damaged"):
        folder.load(info.id, "m", {"layers": 1})
