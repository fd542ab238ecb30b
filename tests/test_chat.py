"""The terminal chat (`python -m inf_llm.chat`) driven as a user drives it: the real CLI in a pseudo-terminal
over the real SmolLM2 model, plus a stdin-pipe session (EOF exits) and the command-line error paths.

One terminal session carries most checks, in order: a turn streams a reply; /load reads a document (with
a progress bar) and a question about it is answered from the memory; /stats shows numbers; /save, /reset,
/restore bring the tokens back and the next turn reuses them; bad /load and /restore input gives one-line
errors; Ctrl-C stops a reply but not the program; /exit exits 0.

The session uses a small memory (n_local 512, 64-token blocks, 256-token prefill chunks) so that a
~800-token document already fills memory blocks and reports prefill progress, greedy decoding and 16 new
tokens per reply; the converted weights go to the test session's cache folder (converted once).
"""

from __future__ import annotations

import codecs
import fcntl
import os
import re
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from inf_llm.chat import ChatArgs, CommandError, parse_args, read_document
from inf_llm.engine.sessions import session_paths
from inf_llm.errors import ConfigError
from tests.conftest import REPO_ROOT

CHAT_OVERRIDES = [
    "model.device=cpu", "model.dtype=float32", "generation.max_new_tokens=16", "generation.temperature=0",
    "chunk_size=256", "model.exc_block_size=256", "model.n_local=512", "model.n_init=64",
    "model.full_attention_tokens=null", "model.block_size=64", "model.topk=4", "model.max_cached_block=8",
]
PASSKEY = "71432"
STARTUP_TIMEOUT = 240  # seconds: a cold GGUF conversion takes ~15-40 s on 2 busy cores
TURN_TIMEOUT = 120
# Terminal size of the pseudo-terminal: wide enough that rich wraps no report line.
COLUMNS, ROWS = 200, 50
ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07]*\x07|[()][A-Za-z0-9]|[=>])")


def make_document(path: Path) -> Path:
    """~800 tokens of filler with one fact in the middle (past the local window once read)."""
    words = "the grass is green the sky is blue the sun is yellow here we go there and back again".split()
    sentences = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)).capitalize() + "." for i in range(60)]
    sentences.insert(30, f"The secret passkey is {PASSKEY}. Remember it.")
    path.write_text(" ".join(sentences), encoding="utf-8")
    return path


def chat_argv(cache_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "inf_llm.chat", *CHAT_OVERRIDES, f"model.weights_cache_dir={cache_dir}", *extra]


class PtyChat:
    """The chat CLI on a pseudo-terminal that is its controlling terminal (so Ctrl-C is a real ^C)."""

    def __init__(self, argv: list[str], log_path: Path):
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLUMNS, 0, 0))
        env = {**os.environ, "TERM": "xterm", "NO_COLOR": "1", "COLUMNS": str(COLUMNS), "LINES": str(ROWS)}
        # setsid + TIOCSCTTY make the pty the child's controlling terminal, so ^C typed into it is a SIGINT
        # (the preexec function only calls ioctl: it takes no lock a thread of this process could hold).
        self.proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=env, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
            start_new_session=True, preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(slave)
        self.master = master
        self.log = log_path.open("w", encoding="utf-8")
        self.text = ""  # everything the program wrote, ANSI sequences and carriage returns removed
        self.pos = 0  # expect() searches from here
        self.at_prompt = False  # the last match was the input prompt
        self._raw = ""
        self._cv = threading.Condition()
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            with self._cv:
                if chunk:
                    self._raw += self._decoder.decode(chunk)
                    self.text = ANSI.sub("", self._raw).replace("\r", "")
                self._cv.notify_all()
            if not chunk:
                return

    def expect(self, pattern: str, timeout: float = TURN_TIMEOUT) -> re.Match:
        """Wait for `pattern` in the output after the last match; move past it."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cv:
            while True:
                match = regex.search(self.text, self.pos)
                if match:
                    self.pos = match.end()
                    return match
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    pytest.fail(f"no {pattern!r} in the chat output; since the last match:\n{self.text[self.pos:]}")
                self._cv.wait(min(left, 0.5))

    def since(self, start: int) -> str:
        return self.text[start:self.pos]

    def prompt(self, timeout: float = TURN_TIMEOUT) -> None:
        self.expect(r"(?:^|\n)> \Z", timeout)

    def send(self, line: str) -> int:
        """Type a line (after waiting for the prompt); returns where its output starts."""
        if not self.at_prompt:
            self.prompt()
        self.at_prompt = False
        start = self.pos
        os.write(self.master, line.encode() + b"\r")
        self.expect(re.escape(line.splitlines()[-1]))
        return start

    def command(self, line: str) -> str:
        """Type a line and return everything it printed up to the next prompt."""
        start = self.send(line)
        self.prompt()
        self.at_prompt = True
        return self.text[start:self.pos]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)
        os.close(self.master)
        self.log.write(self.text)
        self.log.close()


@pytest.fixture
def pty_chat(smollm2_cache_dir: Path, tmp_path: Path) -> Iterator[PtyChat]:
    chat = PtyChat(chat_argv(smollm2_cache_dir), tmp_path / "chat.log")
    try:
        yield chat
    finally:
        chat.close()


def stat(output: str, row: str) -> str:
    match = re.search(rf"^{row} {{2,}}(.+?)\s*$", output, re.MULTILINE)  # rich pads the key column
    assert match, f"/stats has no {row!r} row:\n{output}"
    return match.group(1)


# ------------------------------------------------------------------------------------- the terminal session
def test_chat_session_in_a_terminal(pty_chat: PtyChat, tmp_path: Path):
    chat = pty_chat
    chat.expect(r"SmolLM2-135M-Instruct on cpu \(float32\), inf-llm memory .* ready in", STARTUP_TIMEOUT)

    # A turn streams a reply, then one report line.
    out = chat.command("What is the capital of France?")
    assert "Paris" in out
    assert re.search(r"\[\d+ tokens, .*TTFT [\d.]+ s, prompt \d+ \(0 reused from memory\)", out), out

    # /load: a progress bar during the prefill, an acknowledgement, then a question answered from memory.
    doc = make_document(tmp_path / "notes.txt")
    out = chat.command(f"/load {doc}")
    assert re.search(r"document notes\.txt: \d+ characters, \d+ tokens", out), out
    assert re.search(r"reading notes\.txt .*\d+/\d+ tokens", out), out
    loaded = re.search(r"loaded notes\.txt \((\d+) tokens; (\d+) tokens in memory\)", out)
    assert loaded and int(loaded.group(1)) > 700, out
    out = chat.command("What is the secret passkey?")
    assert PASSKEY in out
    reused = re.search(r"prompt (\d+) \((\d+) reused from memory\)", out)
    assert reused and int(reused.group(2)) == int(loaded.group(2)), out  # only the question was prefilled

    # /stats: tokens, memory bytes, the last turn's speed.
    stats = chat.command("/stats")
    held = int(stat(stats, "tokens held"))
    assert held > int(loaded.group(2))
    memory = re.match(r"[\d.]+ [KMG]iB \(device (\d+) bytes, host (\d+) bytes\)", stat(stats, "memory"))
    assert memory and int(memory.group(1)) + int(memory.group(2)) > 0, stats
    assert int(re.search(r"(\d+) memory blocks per layer", stat(stats, "layout")).group(1)) > 0
    assert re.match(r"\d+ ms$", stat(stats, "TTFT"))
    assert re.match(r"[\d.]+ tok/s \(\d+ ms\)$", stat(stats, "prefill"))
    assert re.match(r"[\d.]+ tok/s \(\d+ ms\)$", stat(stats, "decode"))
    assert "documents: notes.txt" in stat(stats, "conversation")

    # /save, /reset, /restore: the tokens come back and the next turn reuses all of them.
    saved = tmp_path / "session"
    out = chat.command(f"/save {saved}")
    assert f"saved {held} tokens" in out
    assert (tmp_path / "session.pt").is_file() and (tmp_path / "session.json").is_file()
    chat.command("/reset")
    assert stat(chat.command("/stats"), "tokens held") == "0"
    out = chat.command(f"/restore {saved}.pt")
    assert f"restored {held} tokens, 3 turn(s), documents: notes.txt" in out, out
    assert stat(chat.command("/stats"), "tokens held") == str(held)
    out = chat.command("Repeat the passkey from the document.")
    assert re.search(rf"prompt \d+ \({held} reused from memory\)", out), out
    assert PASSKEY in out

    # Bad input to commands: one line each, the session goes on.
    assert "error: no such file: " in chat.command(f"/load {tmp_path / 'missing.txt'}")
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x7fELF\x00\x01\x02" * 100)
    assert "blob.bin is a binary file, not text" in chat.command(f"/load {binary}")
    bad = tmp_path / "bad"
    (tmp_path / "bad.pt").write_bytes(b"not a torch file")
    (tmp_path / "bad.json").write_text("{}")
    assert "bad.json is not a saved session" in chat.command(f"/restore {bad}")
    assert "error: no saved session at" in chat.command(f"/restore {tmp_path / 'nothing'}")
    assert "error: unknown command /nope" in chat.command("/nope")
    assert "/restore PATH" in chat.command("/help")

    # Ctrl-C while the reply streams stops the reply, not the program.
    start = chat.send("Write a long poem about the sea.")
    chat.expect(r"thinking…\n\S")  # the spinner is gone: the reply has started streaming
    os.write(chat.master, b"\x03")
    chat.prompt()
    chat.at_prompt = True
    out = chat.text[start:chat.pos]
    stopped = re.search(r"\[(\d+) tokens?.*stopped\]", out)
    assert stopped and 0 < int(stopped.group(1)) < 16, out
    assert "last turn" in chat.command("/stats")

    chat.send("/exit")
    assert chat.proc.wait(30) == 0


# ------------------------------------------------------------------------------------------- stdin pipe
def test_piped_session_ends_at_eof(smollm2_cache_dir: Path):
    """stdin from a pipe: input lines are echoed into the transcript, EOF (Ctrl-D) exits with status 0."""
    done = subprocess.run(chat_argv(smollm2_cache_dir), input="/stats\n", cwd=REPO_ROOT, capture_output=True,
                          check=False, text=True, timeout=STARTUP_TIMEOUT)
    assert done.returncode == 0, done.stderr
    assert re.search(r"> /stats\n.*tokens held\s+0", done.stdout, re.DOTALL), done.stdout
    assert "Traceback" not in done.stderr


# ------------------------------------------------------------------------------------------ command line
@pytest.mark.parametrize("args, message", [
    (["--num-gpus", "two"], "argument --num-gpus: invalid int value: 'two'"),
    (["--num-gpus", "0"], "--num-gpus must be at least 1, got 0"),
    (["--max-gpu-memory", "lots"], "--max-gpu-memory 'lots' is not a size"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["model.nope=1"], "unknown key 'model.nope'"),
    (["--config", "/nonexistent.yaml"], "config file '/nonexistent.yaml' does not exist"),
    (["--config", "a.yaml", "--inf-llm-config-path", "b.yaml"], "give either --config or --inf-llm-config-path"),
])
def test_bad_command_line_exits_2_with_one_line(args: list[str], message: str):
    done = subprocess.run([sys.executable, "-m", "inf_llm.chat", *args], cwd=REPO_ROOT, capture_output=True,
                          check=False, text=True, timeout=60)
    assert done.returncode == 2
    assert message in done.stderr
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1


def test_bad_model_path_exits_2(tmp_path: Path):
    done = subprocess.run([sys.executable, "-m", "inf_llm.chat", "--model-path", str(tmp_path / "no-model")],
                          cwd=REPO_ROOT, capture_output=True, check=False, text=True, timeout=120)
    assert done.returncode == 2
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr


def test_original_flags_map_to_config_keys():
    args = parse_args(["--model-path", "some/model", "--inf-llm-config-path", "config/mistral-inf-llm.yaml",
                       "--num-gpus", "2", "--max-gpu-memory", "10GiB", "model.topk=32"])
    assert args == ChatArgs(
        config_path=Path("config/mistral-inf-llm.yaml"),
        overrides=["model.path=some/model", "model.gguf_file=null", "server.model_name=null", "model.device_map=auto",
                   "model.device_map=auto", "model.max_gpu_memory=10GiB", "model.topk=32"],
        num_gpus=2, log_level="warning",
    )
    with pytest.raises(ConfigError, match="--max-gpu-memory"):
        parse_args(["--max-gpu-memory", "10"])


def test_read_document_rejects_what_is_not_text(tmp_path: Path):
    with pytest.raises(CommandError, match="no such file"):
        read_document(str(tmp_path / "missing.txt"))
    with pytest.raises(CommandError, match="is a directory"):
        read_document(str(tmp_path))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CommandError, match="not UTF-8 text"):
        read_document(str(tmp_path / "latin1.txt"))
    (tmp_path / "blank.txt").write_text(" \n")
    with pytest.raises(CommandError, match="is empty"):
        read_document(str(tmp_path / "blank.txt"))
    (tmp_path / "ok.txt").write_text("\ufeffhello", encoding="utf-8")
    assert read_document(str(tmp_path / "ok.txt")) == ("ok.txt", "hello")
    assert session_paths("/x/s.pt") == session_paths("/x/s.json") == session_paths("/x/s") == (
        Path("/x/s.pt"), Path("/x/s.json"))
