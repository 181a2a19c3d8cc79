"""Shared pieces of the benchmarks: a simulator in a child process, manifests, rusage of a child."""

from __future__ import annotations

import csv
import json
import os
import resource
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TEXT2IMG = "1904136902449209346"
WEBAPP = "1877265245566922753"
SIM_START_TIMEOUT_S = 30.0


def sim_config(*, concurrency: int, duration_s: float, time_scale: float,
               api_type: str = "SHARED", round_trip_s: float = 0.0,
               faults: dict[str, Any] | None = None, seed: int = 1) -> dict[str, Any]:
    """A config for ``rhbatch sim --config``: every well-formed key is an account (no key on disk).

    ``round_trip_s`` is a network round trip in simulated seconds: the simulator waits it out in
    real seconds (``Faults.latency_s`` = round trip / time scale) before each answer."""
    config: dict[str, Any] = {
        "seed": seed,
        "time_scale": time_scale,
        "task_duration_s": duration_s,
        "queue_delay_s": 0.0,
        "open_accounts": True,
        "default_account": {"api_type": api_type, "concurrency": concurrency, "coins": 1e15},
    }
    faults = dict(faults or {})
    if round_trip_s:
        faults["latency_s"] = round_trip_s / time_scale
    if faults:
        config["faults"] = faults
    return config


class SimProcess:
    """``bench/simproc.py`` in a child process; ``summary()`` reads its audit."""

    def __init__(self, workdir: Path, config: dict[str, Any]):
        path = workdir / f"sim-{secrets.token_hex(4)}.json"
        path.write_text(json.dumps(config), encoding="utf-8")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "simproc.py"), str(path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )
        assert self.proc.stdout is not None
        hello = self._read(SIM_START_TIMEOUT_S)
        self.base_url: str = hello["base_url"]
        self.t0_mono: float = hello["t0_mono"]
        self.time_scale: float = hello["time_scale"]

    def _read(self, timeout_s: float) -> dict[str, Any]:
        import select

        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            raise RuntimeError("the simulator process did not answer in time")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the simulator process exited")
        return json.loads(line)

    def ask(self, command: str, timeout_s: float = 120.0) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._read(timeout_s)

    def mono(self, sim_t: float) -> float:
        """A simulated time as this machine's ``time.monotonic()``."""
        return self.t0_mono + sim_t / self.time_scale

    def close(self) -> None:
        try:
            self.ask("quit", timeout_s=0.1)
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> SimProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_manifest(path: Path, n: int, start: int = 0, *, steps: bool = False) -> Path:
    """``n`` distinct text2img rows (prompt x seed), the shape of a real sweep: three bound
    columns, four with ``steps`` (``3.steps`` too)."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["workflowId", "6.text", "3.seed", "3.cfg"] + ["3.steps"] * steps)
        for i in range(start, start + n):
            row: list[object] = [TEXT2IMG, f"a photo of subject {i // 100}, studio light", i, 7.0]
            writer.writerow(row + [20 + i % 30] * steps)
    return path


def api_key() -> str:
    return secrets.token_hex(16)


def run_child(argv: list[str], *, env: dict[str, str] | None = None, timeout_s: float,
              cwd: Path = ROOT) -> dict[str, Any]:
    """Run ``argv``; its own CPU (user+sys), peak RSS, wall time and exit code, via wait4."""
    import tempfile

    errfile = tempfile.TemporaryFile()
    started = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=errfile)
    deadline = started + timeout_s
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)
    errfile.seek(0)
    stderr = errfile.read().decode(errors="replace")
    errfile.close()
    return {
        "wall_s": time.perf_counter() - started,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "exit": proc.returncode,
        "stderr": stderr[-2000:],
    }


def self_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
