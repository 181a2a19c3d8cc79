"""Several API keys in one run: where they come from, and what each may do.

A batch on RunningHub is bound by the key's slots, not by this machine: a second key doubles the
rate where a second machine adds nothing. Keys come from, in order of precedence:

- ``--keys-file FILE``: one key a line, optional ``label=NAME``, ``max=N`` (the most tasks in flight
  on this key, below what the service allows) and ``max_coins=N`` / ``max_money=N`` (this key's own
  budget, inside the run's)::

      # studio keys
      0123456789abcdef0123456789abcdef  label=studio-a  max=20
      fedcba9876543210fedcba9876543210  label=studio-b  max_coins=5000

  The file holds secrets, so it is refused when group or others may read it (as ssh refuses a loose
  private key): ``chmod 600 FILE``. Blank lines and ``#`` comments are skipped;
- ``RUNNINGHUB_API_KEYS``: comma-separated keys, labelled ``key-1``, ``key-2``, ... in order;
- the one key of ``--api-key`` / ``RUNNINGHUB_API_KEY``, labelled ``key``.

A key is never written anywhere: the run records each key's :func:`~pipeline.config.key_fingerprint`
and label, and every message names a key by its label. Every key is registered for redaction as soon
as it is read.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ENV_API_KEY, Secret, key_fingerprint, register_secret
from pipeline.errors import ConfigError
from pipeline.safetext import escape_controls

ENV_API_KEYS = "RUNNINGHUB_API_KEYS"
KEYS_FILE_MAX_BYTES = 1 << 20  # a keys file is a few lines; anything bigger is the wrong file
_KEY = re.compile(r"[A-Za-z0-9_\-]{8,128}")
_LABEL = re.compile(r"[A-Za-z0-9_.\-]{1,40}")
_OPTIONS = ("label", "max", "max_coins", "max_money")
_KEY_FIX = "copy it again from the RunningHub console (32 letters and digits)"


@dataclass(frozen=True)
class PoolKey:
    """One key of the pool: the secret, how messages name it, and its own limits."""

    secret: Secret
    label: str
    max_in_flight: int | None = None
    max_coins: float | None = None
    max_money: float | None = None

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.secret.reveal())

    def record(self) -> dict[str, object]:
        """What the run stores about this key (never the key itself)."""
        return {"fingerprint": self.fingerprint, "label": self.label, "max": self.max_in_flight,
                "max_coins": self.max_coins, "max_money": self.max_money}


def _problem(where: str, text: str) -> ConfigError:
    return ConfigError(f"{where}: {text}")


def _number(where: str, name: str, text: str, *, whole: bool) -> float:
    try:
        value = int(text) if whole else float(text)
    except ValueError:
        kind = "a whole number" if whole else "a number"
        raise _problem(where, f"{name}={escape_controls(text)} is not {kind}: write e.g. {name}=20") from None
    if not (math.isfinite(value) and value > 0):
        raise _problem(where, f"{name}={escape_controls(text)} must be above 0")
    return value


def _check_key(where: str, key: str) -> None:
    if not _KEY.fullmatch(key):
        # the text is not shown: it may be a real key with one bad character
        raise _problem(where, f"this does not look like a RunningHub key: {_KEY_FIX}")


def parse_keys_line(line: str, where: str) -> PoolKey | None:
    """One line of a keys file (None for a blank line or a comment)."""
    text = line.split("#", 1)[0].strip() if not line.lstrip().startswith("#") else ""
    if not text:
        return None
    key, *options = text.split()
    _check_key(where, key)
    register_secret(key)
    values: dict[str, str] = {}
    for option in options:
        name, eq, value = option.partition("=")
        if not eq or name not in _OPTIONS or not value:
            raise _problem(where, f"{escape_controls(option)!r} is not an option: write KEY followed "
                                  "by any of label=NAME max=N max_coins=N max_money=N")
        if name in values:
            raise _problem(where, f"{name}= is given twice")
        values[name] = value
    label = values.get("label", "")
    if label and not _LABEL.fullmatch(label):
        raise _problem(where, f"label={escape_controls(label)!r}: use up to 40 letters, digits, "
                              "'.', '_' or '-'")
    return PoolKey(
        Secret(key), label,
        int(_number(where, "max", values["max"], whole=True)) if "max" in values else None,
        _number(where, "max_coins", values["max_coins"], whole=False) if "max_coins" in values else None,
        _number(where, "max_money", values["max_money"], whole=False) if "max_money" in values else None,
    )


def read_keys_file(path: str | os.PathLike[str]) -> list[PoolKey]:
    """Every key of a keys file, in order, refused (exit 2, nothing sent) when the file is readable by
    group or others, not a regular file, too large, or has a bad line, a duplicate key or label."""
    shown = escape_controls(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError(f"--keys-file {shown}: no such file: check the path") from None
    except OSError as exc:
        raise ConfigError(f"--keys-file {shown}: cannot open it ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"--keys-file {shown}: not a regular file")
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(
                f"--keys-file {shown}: it holds API keys and others on this machine may read it "
                f"(mode {stat.S_IMODE(info.st_mode):o}): run chmod 600 {shown}, then the same command")
        data = os.read(fd, KEYS_FILE_MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > KEYS_FILE_MAX_BYTES:
        raise ConfigError(f"--keys-file {shown}: over {KEYS_FILE_MAX_BYTES} bytes: not a keys file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"--keys-file {shown}: not UTF-8 text") from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        key = parse_keys_line(line, f"--keys-file {shown} line {number}")
        if key is not None:
            keys.append((number, key))
    if not keys:
        raise ConfigError(f"--keys-file {shown}: no key in it: write one key a line")
    return _labelled(keys, f"--keys-file {shown}")


def _labelled(keys: Sequence[tuple[int, PoolKey]], source: str) -> list[PoolKey]:
    """The keys with a label each (``key-N`` where none is given), refusing duplicates."""
    seen: dict[str, int] = {}
    labels: dict[str, int] = {}
    out = []
    unit = "line" if source.startswith("--keys-file") else "key"
    for position, (line, key) in enumerate(keys, 1):
        where = f"{source} {unit} {line}"
        secret = key.secret.reveal()
        if secret in seen:
            raise _problem(where, f"the same key as {unit} {seen[secret]}: list each key once")
        seen[secret] = line
        label = key.label or f"key-{position}"
        if label in labels:
            raise _problem(where, f"label {label} is already used ({unit} {labels[label]}): give "
                                  "each key its own label")
        labels[label] = line
        out.append(PoolKey(key.secret, label, key.max_in_flight, key.max_coins, key.max_money))
    return out


def resolve_keys(*, keys_file: str | os.PathLike[str] | None = None, api_key: str | None = None,
                 env: Mapping[str, str] | None = None) -> list[PoolKey]:
    """The run's keys: the keys file, else ``RUNNINGHUB_API_KEYS``, else the single key (flag, then
    ``RUNNINGHUB_API_KEY``). Empty when none is given (commands that need a key say so)."""
    environ = os.environ if env is None else env
    if keys_file is not None:
        return read_keys_file(Path(keys_file))
    pooled = environ.get(ENV_API_KEYS, "").strip()
    if pooled and not api_key:
        parts = [p.strip() for p in pooled.split(",")]
        if any(not p for p in parts):
            raise ConfigError(f"{ENV_API_KEYS}: an empty entry: separate keys with single commas")
        found = []
        for number, part in enumerate(parts, 1):
            _check_key(f"{ENV_API_KEYS} key {number}", part)
            register_secret(part)
            found.append((number, PoolKey(Secret(part), "")))
        return _labelled(found, ENV_API_KEYS)
    single = (api_key or environ.get(ENV_API_KEY) or "").strip()
    if not single:
        return []
    _check_key("--api-key" if api_key else ENV_API_KEY, single)
    register_secret(single)
    return [PoolKey(Secret(single), "key")]
