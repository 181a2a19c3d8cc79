"""The key pool's configuration: a keys file (refused when loose, malformed or duplicated, with the
line and the fix), RUNNINGHUB_API_KEYS, the single key; keys never appear in any message."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from pipeline.errors import ConfigError
from pipeline.keys import read_keys_file, resolve_keys


def _key() -> str:
    return secrets.token_hex(16)


def _file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "keys"
    path.write_text(text, encoding="utf-8")
    os.chmod(path, mode)
    return path


def test_a_keys_file_gives_labels_caps_and_budgets(tmp_path):
    a, b, c = _key(), _key(), _key()
    path = _file(tmp_path, f"# studio\n{a}  label=studio-a  max=20\n\n{b} max_coins=5000 # b\n{c}\n")
    keys = read_keys_file(path)
    assert [k.label for k in keys] == ["studio-a", "key-2", "key-3"]
    assert [k.max_in_flight for k in keys] == [20, None, None]
    assert keys[1].max_coins == 5000.0
    assert [k.secret.reveal() for k in keys] == [a, b, c]
    assert all(len(k.fingerprint) == 12 and k.fingerprint not in (a, b, c) for k in keys)
    assert a not in repr(keys) and a not in str(keys[0].record())


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644])
def test_a_keys_file_others_may_read_is_refused_with_the_chmod_fix(tmp_path, mode):
    path = _file(tmp_path, _key() + "\n", mode)
    with pytest.raises(ConfigError, match=r"chmod 600") as info:
        read_keys_file(path)
    assert info.value.exit_code == 2


@pytest.mark.parametrize(("lines", "match"), [
    (["{a}", "{a}"], r"line 2: the same key as line 1"),
    (["{a} label=x", "{b} label=x"], r"line 2: label x is already used \(line 1\)"),
    (["{a} colour=red"], r"line 1: 'colour=red' is not an option"),
    (["{a} max=lots"], r"line 1: max=lots is not a whole number"),
    (["{a} max=0"], r"line 1: max=0 must be above 0"),
    (["{a} max_coins=nan"], r"line 1: max_coins=nan must be above 0"),
    (["{a} max=2 max=3"], r"line 1: max= is given twice"),
    (["# only a comment", "not a key!"], r"line 2: this does not look like a RunningHub key"),
    (["", "# nothing"], r"no key in it"),
])
def test_a_bad_keys_file_names_the_line_and_the_fix(tmp_path, lines, match):
    a, b = _key(), _key()
    path = _file(tmp_path, "\n".join(line.format(a=a, b=b) for line in lines) + "\n")
    with pytest.raises(ConfigError, match=match) as info:
        read_keys_file(path)
    assert a not in str(info.value) and b not in str(info.value)


def test_a_keys_file_that_is_not_a_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        read_keys_file(tmp_path / "absent")
    with pytest.raises(ConfigError, match="not a regular file"):
        read_keys_file(tmp_path)


def test_keys_from_the_environment_and_the_single_key():
    a, b = _key(), _key()
    pooled = resolve_keys(env={"RUNNINGHUB_API_KEYS": f"{a}, {b}", "RUNNINGHUB_API_KEY": _key()})
    assert [(k.label, k.secret.reveal()) for k in pooled] == [("key-1", a), ("key-2", b)]
    single = resolve_keys(api_key=a, env={"RUNNINGHUB_API_KEYS": f"{b}"})
    assert [(k.label, k.secret.reveal()) for k in single] == [("key", a)]
    assert resolve_keys(env={}) == []
    with pytest.raises(ConfigError, match="RUNNINGHUB_API_KEYS key 2: the same key as key 1"):
        resolve_keys(env={"RUNNINGHUB_API_KEYS": f"{a},{a}"})
    with pytest.raises(ConfigError, match="empty entry"):
        resolve_keys(env={"RUNNINGHUB_API_KEYS": f"{a},,{b}"})


def test_the_keys_file_wins_over_the_environment(tmp_path):
    a = _key()
    path = _file(tmp_path, f"{a} label=file\n")
    keys = resolve_keys(keys_file=path, env={"RUNNINGHUB_API_KEYS": _key()})
    assert [k.label for k in keys] == ["file"]
