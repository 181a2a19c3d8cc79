"""Every command in README.md's ```bash blocks runs, in order, against a simulator started here.

RUNNINGHUB_BASE_URL and RUNNINGHUB_API_KEY point at that simulator; every ``outputs/`` path is
moved into a temporary directory. A command that installs, runs this suite, or starts a server
that lives on is mapped to what can run here, or skipped, each with its reason in ``MAPPED``; a
command of that sort that is not listed there fails the test, and so does an entry of ``MAPPED``
that no README command matches any more. Each command must exit 0 (the README documents no other
exit code for them).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
WORKFLOW = ROOT / "pipeline" / "sim" / "workflows" / "text2img.json"
# The simulator here runs 1000x faster than RunningHub; rhbatch's default polling (a task every
# 5 s) would turn each run into minutes of waiting for tasks that finished long ago.
FAST = " --poll-interval 0.05 --account-poll-interval 0.02"
# Commands that must be mapped or skipped: they install, run the suite, or start a server.
NEEDS_MAPPING = re.compile(r"(^|&&\s*|\s)(pip install|python3? -m venv|\S*python -m pytest|"
                           r"\S*\.ci/run|rhbatch sim\b.*&\s*$)")


@dataclass(frozen=True)
class Mapping:
    pattern: str  # regular expression matched (search) against the command
    reason: str
    replace: Callable[[str, Context], str] | None = None  # None: skipped
    background: bool = False  # a server: started, then left running until the end


@dataclass
class Context:
    tmp: Path
    sim_port: int = 0


def _demo(command: str, ctx: Context) -> str:
    return "rhbatch demo --out outputs/demo"


def _standalone_sim(command: str, ctx: Context) -> str:
    return re.sub(r"--port \d+", f"--port {ctx.sim_port}", command.rstrip(" &"))


def _rehearsal(command: str, ctx: Context) -> str:
    return command.replace("127.0.0.1:8765", f"127.0.0.1:{ctx.sim_port}") + FAST


MAPPED = [
    Mapping(r"^python3 -m venv \.venv && \. \.venv/bin/activate && pip install -e '\.\[test\]' "
            r"&& rhbatch demo$",
            "the install steps are what made this test's environment; the demo part runs as "
            "written, its default --out moved to the temporary directory", _demo),
    Mapping(r"^\.venv/bin/python -m pytest$", "the suite itself, which holds this test"),
    Mapping(r"^export RUNNINGHUB_API_KEY=", "the test sets RUNNINGHUB_API_KEY to a key of its "
            "simulator"),
    Mapping(r"^export RUNNINGHUB_BASE_URL=", "the test sets RUNNINGHUB_BASE_URL to its simulator"),
    Mapping(r"^rhbatch run ", "polled faster: see FAST", lambda c, ctx: c + FAST),
    Mapping(r"^rhbatch sim --port 8765 --time-scale 100 &$",
            "a server that runs until Ctrl-C: started on a free port instead of 8765 and stopped "
            "at the end", _standalone_sim, background=True),
    Mapping(r"^RUNNINGHUB_BASE_URL=http://127\.0\.0\.1:8765 ",
            "the rehearsal talks to the `rhbatch sim` started above, on its free port; polled "
            "faster: see FAST", _rehearsal),
    Mapping(r"^python3 -m venv \.venv && \.venv/bin/python -m pip install -e '\.\[test\]'$",
            "installs: this test runs in the environment it made"),
    Mapping(r"^\.venv/bin/python -m (ruff check|mypy) ",
            "lint and type checks are .ci/run's job (their verdict is on the code, not on the "
            "README); here the tool the README names must be installed in this environment",
            lambda c, ctx: re.sub(r"-m (ruff|mypy) .*", r"-m \1 --version", c)),
    Mapping(r"^bash \.ci/run$", "builds and installs a wheel into a clean virtualenv: minutes, "
            "and it runs this suite again"),
]
# What the README says a command prints, checked where it is said.
EXPECTED_OUTPUT = {
    "rhbatch sweep manifests/sweep_example.yaml": "Wrote 24 rows to ",  # "# 24 rows"
    "rhbatch demo": "Demo finished: 16 rows (16 SUCCESS)",  # "a 16-row sweep"
}


def readme_commands(text: str) -> list[str]:
    """The commands of every ```bash block: comments dropped, continuation lines joined."""
    commands: list[str] = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        pending = ""
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).rstrip()
            if line.endswith("\\"):
                pending += line[:-1].rstrip() + " "
                continue
            command = (pending + line.strip()).strip()
            pending = ""
            if command and not command.startswith("#"):
                commands.append(re.sub(r"\s+", " ", command))
    return commands


def mapping_for(command: str) -> Mapping | None:
    for mapping in MAPPED:
        if re.search(mapping.pattern, command):
            return mapping
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the simulator exited at once"
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port} after {timeout_s} s")


def test_the_readme_shows_commands_and_every_mapping_is_used():
    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert len(commands) >= 20, commands
    unmapped = [c for c in commands if NEEDS_MAPPING.search(c) and mapping_for(c) is None]
    assert unmapped == [], f"map or skip these in MAPPED, with the reason: {unmapped}"
    unused = [m.pattern for m in MAPPED if not any(re.search(m.pattern, c) for c in commands)]
    assert unused == [], f"no README command matches these MAPPED entries any more: {unused}"


@pytest.mark.timeout(120)
def test_every_readme_command_runs_against_the_simulator(make_sim, api_key, tmp_path):
    sim = make_sim(concurrency=1, api_type="NORMAL")
    shutil.copyfile(WORKFLOW, tmp_path / "workflow_api.json")  # "ComfyUI's Export (API)"
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "RUNNINGHUB_BASE_URL": sim.base_url, "RUNNINGHUB_API_KEY": api_key,
           "PATH": bin_dir + os.pathsep + os.environ.get("PATH", "")}
    env.pop("RHBATCH_HTTP", None)
    ctx = Context(tmp_path, free_port())
    servers: list[subprocess.Popen] = []
    ran: list[str] = []
    try:
        for command in readme_commands(README.read_text(encoding="utf-8")):
            mapping = mapping_for(command)
            if mapping is not None and mapping.replace is None:
                continue  # skipped, with its reason in MAPPED
            line = mapping.replace(command, ctx) if mapping else command
            line = line.replace("outputs/", f"{tmp_path}/outputs/")
            line = line.replace("workflow_api.json", str(tmp_path / "workflow_api.json"))
            line = line.replace(".venv/bin/python ", f"{sys.executable} ")
            if mapping is not None and mapping.background:
                servers.append(subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=ROOT, env=env,
                                                stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL))
                wait_for_port(ctx.sim_port, servers[-1])
                ran.append(line)
                continue
            done = subprocess.run(["bash", "-c", line], cwd=ROOT, env=env, capture_output=True,
                                  text=True, timeout=60)
            assert done.returncode == 0, (
                f"README command {command!r}\nran as {line!r}\nexit {done.returncode}\n"
                f"stdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}")
            for start, text in EXPECTED_OUTPUT.items():
                if command.startswith(start):
                    assert text in done.stdout + done.stderr, (command, done.stdout, done.stderr)
            ran.append(line)
    finally:
        for server in servers:
            server.terminate()
            server.wait(10)
    assert len(ran) >= 14, ran
    assert (tmp_path / "outputs" / "sweep-run" / "report.html").is_file()
    assert (tmp_path / "outputs" / "rehearsal" / "results.jsonl").is_file()
