"""Terminal chat: `python -m inf_llm.chat` (console script `inf-llm-chat`).

    python -m inf_llm.chat                                    # the default served config (SmolLM2 on CPU)
    python -m inf_llm.chat --model-path mistralai/Mistral-7B-Instruct-v0.2 \
        --inf-llm-config-path config/mistral-inf-llm.yaml --num-gpus 2 --max-gpu-memory 10GiB model.topk=32

Owns: the command line (the original project's flags, `--config` and dotlist overrides), the conversation
(the messages the engine renders into each turn's prompt), the slash commands, saving and restoring a
session's memory, and drawing the engine's events with rich.
Must not know: memory internals (it reads `InfLLMCache.stats()` only) or HTTP.

The memory state stays between turns through the engine's prompt reuse: every turn renders the whole
conversation, and the engine only prefills what its held tokens do not already cover (usually the new user
message), so a document read once with `/load` is not read again for each question.

Bad command-line or config input ends with one line `error: ...` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from inf_llm import openmp  # noqa: E402  (before torch: bounded OpenMP spinning, see inf_llm/openmp.py)

openmp.configure()

from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from rich.progress import (  # noqa: E402
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table  # noqa: E402
from rich.text import Text  # noqa: E402

from inf_llm.config import InfLLMConfig, default_config_path, load_config  # noqa: E402
from inf_llm.errors import (  # noqa: E402
    ConfigError,
    InfLLMError,
    MissingDependencyError,
    ModelLoadError,
    ModelNotFoundError,
    SessionStateError,
    UnsupportedModelError,
)

if TYPE_CHECKING:
    from inf_llm.engine import Done, Engine, Error, Job, Message, SavedSession, SessionInfo

log = logging.getLogger("inf_llm.chat")

PROG = "python -m inf_llm.chat"
PROMPT = "> "
# A line ending with this continues on the next line (multi-line messages typed by hand).
CONTINUATION = "\\"
# Exit statuses: bad command-line/config/model input (as argparse), a model that was found but failed to
# load, and Ctrl-C while loading (128 + SIGINT, as shells report it).
EXIT_USAGE = 2
EXIT_LOAD_FAILED = 1
EXIT_INTERRUPTED = 130
# Startup errors the user fixes by changing the command line or the config: exit status 2.
INPUT_ERRORS = (ConfigError, ModelNotFoundError, UnsupportedModelError, MissingDependencyError)
# `--max-gpu-memory`: a number and a unit accelerate understands (10GiB, 7.5GB, 800MiB).
GPU_MEMORY = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B)$", re.IGNORECASE)

# /load: the user turn a document becomes; later questions refer to "the document".
DOCUMENT_TEMPLATE = "Document: {name}\n\n{text}\n\nI will ask you questions about this document."
# The answer to a document turn is an acknowledgement; reading the document is the work. Capped so /load
# does not spend minutes of CPU decoding a summary nobody asked for.
DOCUMENT_REPLY_TOKENS = 48
# Bytes of a file inspected for NUL bytes (binary files) before decoding it.
BINARY_SNIFF_BYTES = 8192
# Larger files are refused: tokenizing them takes minutes and gigabytes, and no model here can read them.
MAX_DOCUMENT_BYTES = 64 * 1024 * 1024
# Seconds between checks that the worker thread is alive while waiting for a job's events.
EVENT_POLL_SECONDS = 0.5

HELP = [
    ("/help", "this list"),
    ("/load FILE", "read a text document into the context (later questions can refer to it)"),
    ("/stats", "tokens held, memory size, the last turn's speed"),
    ("/save PATH", "save the session's memory and conversation (PATH.pt + PATH.json)"),
    ("/restore PATH", "restore a session saved with /save (same model and memory config)"),
    ("/reset", "forget the conversation and the memory"),
    ("/exit", "quit (also /quit, Ctrl-D)"),
]


class CommandError(InfLLMError):
    """A slash command was given bad input (a missing or binary file, a bad saved session)."""

    http_status = 400
    error_type = "invalid_request_error"


# ------------------------------------------------------------------------------------------ command line
class _Parser(argparse.ArgumentParser):
    """argparse that raises ConfigError (one line, no usage dump) instead of printing and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{message} (see {PROG} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Chat in the terminal with an InfLLM-patched model. Commands: "
        + ", ".join(cmd.split()[0] for cmd, _ in HELP) + ".",
    )
    parser.add_argument("--config", help=f"YAML config (default: $INFLLM_CONFIG or {default_config_path()})")
    parser.add_argument("--inf-llm-config-path", metavar="PATH",
                        help="the original project's name for --config (its YAML presets load as they are)")
    parser.add_argument("--model-path", help="model.path: hub id, local folder, .gguf file or package:NAME")
    parser.add_argument("--num-gpus", type=int, metavar="N",
                        help="spread the model over the first N visible GPUs (model.device_map=auto)")
    parser.add_argument("--max-gpu-memory", metavar="SIZE",
                        help="memory limit per GPU, e.g. 10GiB (model.max_gpu_memory, with device_map auto)")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides in dot notation, e.g. model.topk=32 generation.temperature=0")
    return parser


@dataclass(frozen=True)
class ChatArgs:
    config_path: Path
    overrides: list[str]
    num_gpus: int | None
    log_level: str


def parse_args(argv: list[str] | None) -> ChatArgs:
    """Command line -> config path and dotlist overrides. Raises ConfigError naming the bad flag."""
    args = build_parser().parse_intermixed_args(argv)
    if args.config is not None and args.inf_llm_config_path is not None:
        raise ConfigError("give either --config or --inf-llm-config-path, not both (they name the same file)")
    path = args.config or args.inf_llm_config_path
    overrides: list[str] = []
    if args.model_path is not None:
        if not args.model_path.strip():
            raise ConfigError("--model-path is empty")
        # The config's gguf_file names a file inside its own model.path, not inside the new one, and its
        # server.model_name names its own model.
        overrides += [f"model.path={args.model_path}", "model.gguf_file=null", "server.model_name=null"]
    if args.num_gpus is not None:
        if args.num_gpus < 1:
            raise ConfigError(f"--num-gpus must be at least 1, got {args.num_gpus}")
        if args.num_gpus > 1:
            overrides.append("model.device_map=auto")
    if args.max_gpu_memory is not None:
        size = args.max_gpu_memory.strip()
        if not GPU_MEMORY.match(size):
            raise ConfigError(
                f"--max-gpu-memory {args.max_gpu_memory!r} is not a size; write a number and a unit, e.g. 10GiB"
            )
        overrides += ["model.device_map=auto", f"model.max_gpu_memory={size.replace(' ', '')}"]
    # The trailing dotlist comes last: an explicit key=value wins over what a flag implies.
    overrides += list(args.overrides)
    return ChatArgs(Path(path) if path is not None else default_config_path(), overrides, args.num_gpus,
                    args.log_level)


def load_chat_config(args: ChatArgs) -> InfLLMConfig:
    """The config file with the flags and overrides applied. Raises ConfigError."""
    cfg = load_config(args.config_path, args.overrides)
    if args.num_gpus is not None and args.num_gpus > 1 and cfg.model.device == "cpu":
        raise ConfigError(f"--num-gpus {args.num_gpus} contradicts model.device=cpu; drop one of them")
    return cfg


def limit_visible_gpus(num_gpus: int | None) -> None:
    """--num-gpus N: let this process see only the first N GPUs (as the original project's max_memory map
    did). Must run before CUDA is initialized; a CUDA_VISIBLE_DEVICES already set is narrowed, not replaced."""
    if num_gpus is None or num_gpus < 2:
        return
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        log.warning("--num-gpus: CUDA is already initialized in this process; all visible GPUs may be used")
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        ids = [str(i) for i in range(num_gpus)]
    else:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(ids[:num_gpus])


def check_gpus(cfg: InfLLMConfig, num_gpus: int | None) -> None:
    """A device map needs GPUs: refuse a request for more than are visible. Raises ConfigError."""
    if cfg.model.device_map is None:
        return
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    wanted = num_gpus or 1
    if count < wanted:
        raise ConfigError(
            f"--num-gpus/--max-gpu-memory (model.device_map={cfg.model.device_map}) need {wanted} CUDA GPU(s), "
            f"but {count} {'is' if count == 1 else 'are'} visible; drop those flags to run on one device"
        )


# ------------------------------------------------------------------------------------------- documents
def read_document(path_text: str) -> tuple[str, str]:
    """(display name, text) of a UTF-8 text file. Raises CommandError for a missing, binary or empty file."""
    path = Path(path_text).expanduser()
    if not path.exists():
        raise CommandError(f"no such file: {path_text}")
    if path.is_dir():
        raise CommandError(f"{path_text} is a directory, not a text file")
    try:
        size = path.stat().st_size
        if size > MAX_DOCUMENT_BYTES:
            raise CommandError(f"{path_text} is {size / 2**20:.0f} MiB; documents up to "
                               f"{MAX_DOCUMENT_BYTES // 2**20} MiB can be loaded")
        data = path.read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read {path_text}: {exc.strerror or exc}") from None
    if b"\x00" in data[:BINARY_SNIFF_BYTES]:
        raise CommandError(f"{path_text} is a binary file, not text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CommandError(f"{path_text} is not UTF-8 text (undecodable byte at offset {exc.start})") from None
    if not text.strip():
        raise CommandError(f"{path_text} is empty")
    return path.name, text


# --------------------------------------------------------------------------------------------- session
@dataclass
class TurnResult:
    """What one turn ended with: the final event and whether the conversation kept it."""

    final: Done | Error
    kept: bool


@dataclass
class ChatSession:
    """The conversation, and the engine whose memory state holds it.

    The engine holds the memory and the token ids it covers; the session reads and replaces them only through
    the engine's session jobs (session_info, save, restore, reset), which run in its worker thread.
    """

    engine: Engine
    cfg: InfLLMConfig
    system: str | None = None
    history: list[Message] = field(default_factory=list)
    documents: list[str] = field(default_factory=list)
    last: Done | None = None

    # --- memory state (the engine's session jobs: they run in its worker thread, after any queued turn) ---
    def info(self) -> SessionInfo:
        return self.engine.session_info().result()

    @property
    def held_tokens(self) -> int:
        return self.info().held_tokens

    def reset(self) -> None:
        self.engine.reset().result()
        self.history.clear()
        self.documents.clear()
        self.last = None

    def memory_stats(self) -> dict[str, int] | None:
        """Totals of `InfLLMCache.stats()` over layers, or None while no layer holds a memory."""
        layers = self.info().layers
        if not layers:
            return None
        return {
            "device_bytes": sum(s.device_bytes for s in layers),
            "host_bytes": sum(s.host_bytes for s in layers),
            "blocks": layers[0].blocks,
            "window_tokens": layers[0].window_tokens,
            "init_tokens": layers[0].init_tokens,
            "cache_hits": sum(s.cache_hits for s in layers),
            "cache_misses": sum(s.cache_misses for s in layers),
        }

    # --- turns --------------------------------------------------------------------------------------
    def submit(self, content: str, max_new_tokens: int | None = None) -> Job:
        """Queue a turn whose user message is `content` (raises RequestError / PromptTooLongError)."""
        from inf_llm.engine import build_messages

        prompt = self.engine.prepare_chat(build_messages(content, self.history, self.system))
        return self.engine.submit(prompt, self.engine.sampling(max_new_tokens=max_new_tokens))

    def finish(self, content: str, final: Done | Error) -> TurnResult:
        """Record a finished turn. A reply cut short by Ctrl-C is kept as it is (the memory holds it too, so
        the next prompt still extends what the memory holds); a turn with no reply at all is dropped."""
        from inf_llm.engine import Done, Message

        if not isinstance(final, Done):
            return TurnResult(final, kept=False)
        self.last = final
        if final.finish_reason == "cancelled" and not final.text:
            return TurnResult(final, kept=False)
        self.history += [Message("user", content), Message("assistant", final.text)]
        return TurnResult(final, kept=True)

    # --- /save and /restore -------------------------------------------------------------------------
    def save(self, target: str) -> SavedSession:
        """Save the memory and the conversation (NAME.pt + NAME.json: inf_llm/engine/sessions.py). Raises
        CommandError."""
        metadata = {
            "system": self.system, "documents": self.documents,
            "history": [{"role": m.role, "content": m.content} for m in self.history],
        }
        try:
            return self.engine.save(target, metadata).result()
        except SessionStateError as exc:
            hint = " (say something or /load a document first)" if str(exc).startswith("nothing to save") else ""
            raise CommandError(f"{exc}{hint}") from None

    def restore(self, target: str) -> SavedSession:
        """Replace the memory and the conversation with a saved session. Raises CommandError; on error the
        current session is unchanged."""
        from inf_llm.engine import Message
        from inf_llm.engine.sessions import session_paths

        _, sidecar = session_paths(target)
        try:
            self._check_conversation(sidecar)  # before the engine replaces its memory
            saved = self.engine.restore(target).result()
        except SessionStateError as exc:
            raise CommandError(str(exc)) from None
        data = saved.metadata
        self.system = data.get("system")
        self.history = [Message(str(m["role"]), str(m["content"])) for m in data["history"]]
        self.documents = [str(d) for d in data.get("documents", [])]
        self.last = None
        return saved

    @staticmethod
    def _check_conversation(sidecar: Path) -> None:
        """The chat's part of a session file (system, documents, history) is well formed; SessionStateError."""
        from inf_llm.engine.sessions import LEGACY_KINDS, SESSION_FORMAT, SESSION_KIND

        try:
            data = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return  # not readable at all: the engine's restore names the file and the reason
        if (not isinstance(data, dict) or data.get("kind") not in (SESSION_KIND, *LEGACY_KINDS)
                or data.get("format") != SESSION_FORMAT):
            return  # not a session of this format: the same
        try:
            for m in data["history"]:
                str(m["role"]), str(m["content"])
            if not isinstance(data.get("documents", []), list):
                raise TypeError("documents is not a list")
            system = data.get("system")
            if system is not None and not isinstance(system, str):
                raise TypeError(f"system is {type(system).__name__}, not a string")
        except (KeyError, TypeError, ValueError) as exc:
            raise SessionStateError(f"{sidecar} is damaged ({type(exc).__name__}: {exc})") from None


# ------------------------------------------------------------------------------------------ rendering
class _TokensPerSecond(ProgressColumn):
    def render(self, task: Task) -> Text:
        speed = task.speed
        return Text(f"{speed:.0f} tok/s" if speed else "", style="progress.data.speed")


@contextmanager
def _sigint_cancels(job: Job) -> Iterator[None]:
    """While a job runs, Ctrl-C cancels it (the reply stops, the program goes on). Only the main thread may
    install signal handlers; elsewhere Ctrl-C keeps its default meaning."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, lambda signum, frame: job.cancel())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _num(value: float | None, fmt: str = "{:.1f}", unit: str = "") -> str:
    return "n/a" if value is None else fmt.format(value) + unit


class ChatApp:
    """The read-eval-print loop: reads lines, runs commands and turns, draws events."""

    def __init__(self, session: ChatSession, console: Console, echo_input: bool):
        self.session = session
        self.console = console
        self.echo_input = echo_input  # stdin is not a terminal: show what was read, for a readable transcript
        self.commands: dict[str, Callable[[str], bool]] = {
            "/help": self.cmd_help, "/load": self.cmd_load, "/stats": self.cmd_stats, "/save": self.cmd_save,
            "/restore": self.cmd_restore, "/reset": self.cmd_reset, "/exit": self.cmd_exit, "/quit": self.cmd_exit,
        }

    # --- the loop -----------------------------------------------------------------------------------
    def run(self) -> int:
        while True:
            try:
                line = self.read_message()
            except EOFError:
                self.console.print()
                return 0
            except KeyboardInterrupt:
                self.console.print("\n[dim](Ctrl-C stops a reply; /exit or Ctrl-D quits)[/dim]")
                continue
            if line is None:
                continue
            try:
                if not self.handle(line):
                    return 0
            except KeyboardInterrupt:  # outside a reply (e.g. tokenizing a large document): drop the command
                self.console.print("\n[dim]interrupted[/dim]")

    def read_message(self) -> str | None:
        """One message: a line, or several joined where a line ends with a backslash. None if blank."""
        parts: list[str] = []
        prompt = PROMPT
        while True:
            line = input(prompt)
            if self.echo_input:
                self.console.print(line, markup=False, highlight=False)
            if line.endswith(CONTINUATION):
                parts.append(line[: -len(CONTINUATION)])
                prompt = "." * (len(PROMPT) - 1) + " "
                continue
            parts.append(line)
            text = "\n".join(parts)
            return text if text.strip() else None

    def handle(self, line: str) -> bool:
        """Run one command or turn. False when the chat should end."""
        stripped = line.strip()
        if stripped.startswith("/"):
            name, _, rest = stripped.partition(" ")
            command = self.commands.get(name.lower())
            if command is None:
                self.error(f"unknown command {name}; /help lists the commands")
                return True
            try:
                return command(rest.strip())
            except InfLLMError as exc:
                self.error(str(exc))
                return True
        try:
            self.turn(line)
        except InfLLMError as exc:
            self.error(str(exc))
        return True

    def error(self, message: str) -> None:
        self.console.print(f"[bold red]error:[/bold red] {escape(message)}")

    # --- turns --------------------------------------------------------------------------------------
    def turn(self, content: str, label: str = "the conversation", max_new_tokens: int | None = None) -> TurnResult:
        job = self.session.submit(content, max_new_tokens)
        final = self.consume(job, label)
        result = self.session.finish(content, final)
        self.report(result)
        return result

    def consume(self, job: Job, label: str) -> Done | Error:
        """Draw the job's events until its final one: a spinner until something happens, a progress bar
        during a long prefill, then the streamed reply."""
        import queue

        from inf_llm.engine import Done, Error, TextDelta
        from inf_llm.engine.events import Progress as PrefillProgress

        console = self.console
        status = console.status("[dim]thinking…[/dim]", spinner="dots")
        status.start()
        bar: Progress | None = None
        bar_task = None
        streamed = False
        engine = self.session.engine

        def stop_displays() -> None:
            nonlocal bar
            status.stop()
            if bar is not None:
                bar.stop()
                bar = None

        with _sigint_cancels(job):
            try:
                while True:
                    try:
                        event = next(job.events(timeout=EVENT_POLL_SECONDS))
                    except queue.Empty:
                        if not engine.alive and job.final is None:
                            return Error("the generation worker stopped", "internal_error", 500)
                        continue
                    if isinstance(event, PrefillProgress):
                        if bar is None and not streamed:
                            status.stop()
                            bar = Progress(
                                TextColumn(f"reading {escape(label)}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("tokens"), _TokensPerSecond(), TimeRemainingColumn(),
                                console=console,
                            )
                            bar.start()
                            bar_task = bar.add_task(label, total=event.total, completed=event.processed)
                        elif bar is not None:
                            bar.update(bar_task, total=event.total, completed=event.processed)
                    elif isinstance(event, TextDelta):
                        if not streamed:
                            if bar is not None:  # the last prompt token is fed by the first decode step
                                bar.update(bar_task, completed=bar.tasks[0].total)
                            stop_displays()
                            streamed = True
                        console.print(event.text, end="", soft_wrap=True, markup=False, highlight=False,
                                      emoji=False)
                    elif isinstance(event, (Done, Error)):
                        return event
            finally:
                stop_displays()
                if streamed:
                    console.print()

    def report(self, result: TurnResult) -> None:
        """One dim line after a reply: its length, speed and what the memory reused."""
        from inf_llm.engine import Done

        final = result.final
        if not isinstance(final, Done):
            self.error(final.message)
            if self.session.held_tokens == 0 and self.session.history:
                self.console.print("[dim]the memory was cleared; the next turn reads the conversation again[/dim]")
            return
        u, t = final.usage, final.timings
        parts = [f"{u.completion_tokens} token{'' if u.completion_tokens == 1 else 's'}"]
        if t.decode_tokens_per_s is not None:
            parts.append(f"{t.decode_tokens_per_s:.1f} tok/s")
        if t.ttft_ms is not None:
            parts.append(f"TTFT {t.ttft_ms / 1000:.2f} s")
        parts.append(f"prompt {u.prompt_tokens} ({u.cached_tokens} reused from memory)")
        reason = {"stop": "", "length": "max_new_tokens reached", "cancelled": "stopped"}[final.finish_reason]
        if reason:
            parts.append(reason)
        self.console.print(f"[dim]\\[{escape(', '.join(parts))}][/dim]")
        if final.truncated is not None:
            self.console.print(
                f"[yellow]the conversation ({final.truncated.original_tokens} tokens) is longer than max_len="
                f"{self.session.cfg.max_len}; the model saw {final.truncated.kept_tokens} of them[/yellow]"
            )
        if final.finish_reason == "cancelled" and not result.kept:
            self.console.print("[dim]stopped before the reply started; nothing was added to the conversation[/dim]")
        if final.finish_reason == "cancelled" and self.session.held_tokens == 0 and self.session.history:
            # A stop that lands inside a forward pass leaves the layers out of step: the engine drops the memory.
            self.console.print("[dim]the memory was cleared; the next turn reads the conversation again[/dim]")

    # --- commands -----------------------------------------------------------------------------------
    @staticmethod
    def one_argument(command: str, rest: str, what: str) -> str:
        """The command's single argument: the rest of the line if it names an existing path (spaces and
        quotes as typed), else one shell-quoted word."""
        if rest and Path(rest).expanduser().exists():
            return rest
        try:
            args = shlex.split(rest)
        except ValueError as exc:
            raise CommandError(f"{command}: {exc}") from None
        if len(args) != 1:
            raise CommandError(f"usage: {command} {what}")
        return args[0]

    def cmd_help(self, rest: str) -> bool:
        table = Table(show_header=False, box=None, pad_edge=False)
        for cmd, text in HELP:
            table.add_row(f"[bold]{escape(cmd)}[/bold]", text)
        self.console.print(table)
        self.console.print("[dim]Anything else is a message to the model; end a line with \\ to continue it. "
                           "Ctrl-C stops a reply.[/dim]")
        return True

    def cmd_load(self, rest: str) -> bool:
        path = self.one_argument("/load", rest, "FILE")
        name, text = read_document(path)
        content = DOCUMENT_TEMPLATE.format(name=name, text=text)
        tokens = self.session.engine.count_tokens(text)
        self.console.print(f"[dim]document {escape(name)}: {len(text)} characters, {tokens} tokens[/dim]")
        max_new = min(self.session.cfg.generation.max_new_tokens, DOCUMENT_REPLY_TOKENS)
        result = self.turn(content, label=name, max_new_tokens=max_new)
        if result.kept:
            self.session.documents.append(name)
            self.console.print(f"[green]loaded {escape(name)}[/green] [dim]({tokens} tokens; "
                               f"{self.session.held_tokens} tokens in memory)[/dim]")
        else:
            self.console.print(f"[yellow]{escape(name)} was not loaded[/yellow]")
        return True

    def cmd_stats(self, rest: str) -> bool:
        session = self.session
        cfg = session.cfg
        table = Table(show_header=False, box=None, pad_edge=False)
        info = session.engine.info
        table.add_row("model", f"{info.model_name} on {info.device} ({info.dtype})")
        m = cfg.model
        table.add_row("memory type", f"{m.type.value} (n_init {m.n_init}, n_local {m.n_local}, block_size "
                                     f"{m.block_size}, topk {m.topk})")
        table.add_row("tokens held", str(session.held_tokens))
        table.add_row("conversation", f"{len(session.history) // 2} turn(s), documents: "
                                      f"{', '.join(session.documents) or 'none'}")
        mem = session.memory_stats()
        if mem is None:
            table.add_row("memory", "empty" if not session.held_tokens else "restored; loads at the next turn")
        else:
            table.add_row("memory", f"{human_bytes(mem['device_bytes'] + mem['host_bytes'])} "
                                    f"(device {mem['device_bytes']} bytes, host {mem['host_bytes']} bytes)")
            table.add_row("layout", f"{mem['init_tokens']} initial + {mem['window_tokens']} window tokens, "
                                    f"{mem['blocks']} memory blocks per layer")
            if mem["cache_hits"] or mem["cache_misses"]:
                table.add_row("block cache", f"{mem['cache_hits']} hits, {mem['cache_misses']} misses")
        last = session.last
        if last is None:
            table.add_row("last turn", "none")
        else:
            u, t = last.usage, last.timings
            table.add_row("last turn", f"prompt {u.prompt_tokens} tokens ({u.cached_tokens} reused), "
                                       f"{u.completion_tokens} generated, {last.finish_reason}")
            table.add_row("TTFT", _num(t.ttft_ms, "{:.0f}", " ms"))
            table.add_row("prefill", f"{_num(t.prefill_tokens_per_s, unit=' tok/s')} "
                                     f"({_num(t.prefill_ms, '{:.0f}', ' ms')})")
            table.add_row("decode", f"{_num(t.decode_tokens_per_s, unit=' tok/s')} "
                                    f"({_num(t.decode_ms, '{:.0f}', ' ms')})")
        self.console.print(table)
        return True

    def cmd_save(self, rest: str) -> bool:
        target = self.one_argument("/save", rest, "PATH")
        saved = self.session.save(target)
        size = saved.cache_path.stat().st_size
        self.console.print(f"[green]saved[/green] {saved.held_tokens} tokens to {escape(str(saved.cache_path))} "
                           f"({human_bytes(size)}) and {escape(str(saved.sidecar))}")
        return True

    def cmd_restore(self, rest: str) -> bool:
        target = self.one_argument("/restore", rest, "PATH")
        saved = self.session.restore(target)
        s = self.session
        self.console.print(f"[green]restored[/green] {saved.held_tokens} tokens, {len(s.history) // 2} turn(s)"
                           + (f", documents: {escape(', '.join(s.documents))}" if s.documents else ""))
        return True

    def cmd_reset(self, rest: str) -> bool:
        self.session.reset()
        self.console.print("[dim]conversation and memory cleared[/dim]")
        return True

    def cmd_exit(self, rest: str) -> bool:
        return False


# ----------------------------------------------------------------------------------------------- main
def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own status line shows loading
    if logging.getLevelName(level.upper()) >= logging.WARNING:
        hf_logging.set_verbosity_error()


def _load(cfg: InfLLMConfig, console: Console) -> Engine:
    from inf_llm.engine import load_engine

    with console.status("[dim]loading the model…[/dim]", spinner="dots") as status:
        def progress(phase: str, fraction: float) -> None:
            status.update(f"[dim]loading the model: {escape(phase)} ({fraction:.0%})…[/dim]")

        return load_engine(cfg, progress=progress)


def main(argv: list[str] | None = None) -> int:
    def fail(message: str, status: int) -> int:
        print(f"error: {message}", file=sys.stderr)  # one line: plain print, rich would wrap it
        return status

    try:
        args = parse_args(argv)
        cfg = load_chat_config(args)
        limit_visible_gpus(args.num_gpus)
        check_gpus(cfg, args.num_gpus)
    except ConfigError as exc:
        return fail(str(exc), EXIT_USAGE)
    try:
        import readline  # noqa: F401  (line editing and history for input(), where available)
    except ImportError:
        pass

    console = Console(highlight=False)
    _configure_logging(args.log_level)
    started = time.perf_counter()
    try:
        engine = _load(cfg, console)
    except INPUT_ERRORS as exc:
        return fail(str(exc), EXIT_USAGE)
    except ModelLoadError as exc:
        return fail(str(exc), EXIT_LOAD_FAILED)
    except KeyboardInterrupt:
        return fail("interrupted while loading the model", EXIT_INTERRUPTED)

    info = engine.info
    m = cfg.model
    console.print(f"[bold]{escape(info.model_name)}[/bold] on {info.device} ({info.dtype}), {m.type.value} memory "
                  f"(n_local {m.n_local}, topk {m.topk}), ready in {time.perf_counter() - started:.1f} s. "
                  f"[dim]/help lists the commands.[/dim]")
    session = ChatSession(engine, cfg, system=cfg.generation.system_prompt)
    try:
        return ChatApp(session, console, echo_input=not sys.stdin.isatty()).run()
    finally:
        engine.shutdown(reason="the chat ended", wait=2.0)


if __name__ == "__main__":
    sys.exit(main())
