"""Shared fixtures: a real simulator on loopback, keys made at run time, fast run settings."""

from __future__ import annotations

import csv
import json
import os
import secrets
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

TEXT2IMG = "1904136902449209346"

# The environment rhbatch reads; each test starts without any of it (a developer's own key or base URL
# must never reach a test), and sets what it needs with monkeypatch.
ENV_PREFIXES = ("RUNNINGHUB_", "RHBATCH_")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test: no rhbatch environment from outside, and the redaction registry (process-wide:
    every key a test registers) put back as it was, so one test's key cannot hide another's leak."""
    from pipeline import config

    for name in list(os.environ):
        if name.startswith(ENV_PREFIXES):
            monkeypatch.delenv(name)
    registered = set(config._REDACT_KEYS)
    yield
    config._REDACT_KEYS.clear()
    config._REDACT_KEYS.update(registered)


@pytest.fixture
def api_key() -> str:
    return secrets.token_hex(16)


@pytest.fixture
def make_sim(api_key: str) -> Iterator[Callable[..., Any]]:
    """Start simulators with an account for ``api_key``; all are stopped after the test."""
    from pipeline.sim import AccountConfig, SimConfig, Simulator

    started: list[Any] = []

    def factory(*, concurrency: int = 50, coins: float = 10**9, api_type: str = "SHARED",
                **config: Any) -> Any:
        config.setdefault("time_scale", 1000.0)
        config.setdefault("task_duration_s", (10.0, 30.0))
        config.setdefault("queue_delay_s", (0.0, 2.0))
        accounts = config.pop("accounts", None) or [
            AccountConfig(key=api_key, api_type=api_type, concurrency=concurrency, coins=coins)
        ]
        sim = Simulator(SimConfig(accounts=accounts, **config))
        sim.__enter__()
        started.append(sim)
        return sim

    yield factory
    for sim in reversed(started):
        sim.__exit__(None, None, None)


@pytest.fixture
def key(api_key: str) -> str:
    """The simulator tests' name for the run-time key."""
    return api_key


@pytest.fixture
def frozen_sim(api_key: str) -> Iterator[Callable[..., Any]]:
    """Start simulators whose clock stands still (move it with ``sim.advance``), each with a
    ``SimClient`` for ``api_key``; ``client_timeout_s`` sets that client's timeout."""
    from pipeline.sim import AccountConfig, SimConfig, Simulator
    from pipeline.sim.testing import SimClient

    opened: list[Any] = []

    def factory(*, client_timeout_s: float | None = None, **config: Any) -> tuple[Any, Any]:
        config.setdefault("time_scale", 1e-9)
        config.setdefault("queue_delay_s", 1.0)
        config.setdefault("task_duration_s", 10.0)
        config.setdefault("accounts", [AccountConfig(key=api_key)])
        sim = Simulator(SimConfig(**config))
        sim.start()
        opened.append(sim)
        client = SimClient(sim, api_key, **({"timeout_s": client_timeout_s} if client_timeout_s else {}))
        opened.append(client)
        return sim, client

    yield factory
    for thing in reversed(opened):
        thing.close()


# One small create that every simulator fault test sends.
SIM_CREATE = {"workflowId": "1904136902449209346",
              "nodeInfoList": [{"nodeId": "3", "fieldName": "seed", "fieldValue": 1}]}


@pytest.fixture
def fault_sim(frozen_sim: Callable[..., Any]) -> Callable[..., Any]:
    """``fault_sim(faults, **config)``: a frozen-clock simulator with ``faults`` and a client
    whose timeout (5 s) outlasts the stalls and trickles those tests inject."""

    def factory(faults: Any, **config: Any) -> tuple[Any, Any]:
        return frozen_sim(faults=faults, client_timeout_s=5.0, **config)

    return factory


def fast_settings(sim: Any, key: str, **overrides: Any) -> Any:
    from pipeline.config import resolve_settings

    values: dict[str, Any] = {
        "concurrency": 20,
        "poll_interval_s": 0.05,
        "account_poll_interval_s": 0.01,
        "max_poll_interval_s": 0.5,
        "capacity_backoff_s": 0.05,
        "max_capacity_backoff_s": 0.3,
        "results_flush_interval_s": 0.5,
    }
    values.update(overrides)
    return resolve_settings(api_key=key, base_url=sim.base_url, env={}, **values)


FAST_FLAGS = ["--poll-interval", "0.05", "--account-poll-interval", "0.01"]


def explicit_row(number: int, *overrides: tuple[str, str, Any], workflow_id: str = TEXT2IMG) -> Any:
    """A manifest Row numbered ``number`` sending ``(nodeId, fieldName, value)`` overrides."""
    from pipeline.manifest import make_row

    items = [{"nodeId": n, "fieldName": f, "fieldValue": v} for n, f, v in overrides]
    return make_row(number - 1, number, f"r{number}", workflow_id, items)


def write_manifest(path: Path, n: int, *, workflow_id: str = TEXT2IMG, extra: dict | None = None
                   ) -> Path:
    """A CSV manifest of ``n`` distinct prompt x seed rows."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        columns = ["workflowId", "6.text", "3.seed", "3.cfg"] + list(extra or {})
        writer.writerow(columns)
        for i in range(n):
            writer.writerow(
                [workflow_id, f"prompt number {i // 10}", i, 7.0] + list((extra or {}).values())
            )
    return path


def read_results(run_dir: Path) -> list[dict[str, Any]]:
    with (run_dir / "results.jsonl").open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def canonical(node_info_list: Any) -> str:
    items = sorted(
        (str(i["nodeId"]), str(i["fieldName"]), json.dumps(i["fieldValue"])) for i in node_info_list
    )
    return json.dumps(items)


async def no_sleep(_: float) -> None:
    """A retry policy's sleep that returns at once."""
    return None


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
