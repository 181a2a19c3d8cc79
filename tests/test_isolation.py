"""The autouse isolation in conftest: each test starts without rhbatch's environment and with the
redaction registry as it was before the previous test."""

from __future__ import annotations

import os
import secrets

from pipeline import config

_seen: dict[str, str] = {}


def test_a_registers_a_secret_and_sets_the_key(monkeypatch) -> None:
    value = secrets.token_hex(16)
    _seen["secret"] = value
    config.register_secret(value)
    monkeypatch.setenv("RUNNINGHUB_API_KEY", value)
    assert config.redact(f"key={value}").count(value) == 0


def test_b_starts_clean() -> None:
    assert _seen, "test_a must run first (same module, file order)"
    assert _seen["secret"] not in config._REDACT_KEYS
    assert not [k for k in os.environ if k.startswith(("RUNNINGHUB_", "RHBATCH_"))]
