"""Messages that must be true and usable (issue #12): the resume line, the 806 advice, the fix for
each filesystem error, and a run that remembers the service it was started against."""

from __future__ import annotations

import asyncio
import errno
import secrets
import shlex
import sys
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from conftest import FAST_FLAGS, read_results, write_manifest

from pipeline import store as st
from pipeline.cli import cli
from pipeline.errors import RunFatalError, StorageError, api_error_for, site_fix

RUN_FLAGS = [*FAST_FLAGS, "-q", "--concurrency", "10"]
BOTH_SITES = ("wrong key or wrong site: check RUNNINGHUB_API_KEY; a runninghub.ai key needs "
              "RUNNINGHUB_BASE_URL=https://www.runninghub.ai, a runninghub.cn key "
              "RUNNINGHUB_BASE_URL=https://www.runninghub.cn")


def invoke(args: list[str], env: dict[str, str | None], monkeypatch=None):
    """Run the CLI; with ``monkeypatch``, ``sys.argv`` is what a shell would have passed."""
    if monkeypatch is not None:
        monkeypatch.setattr(sys, "argv", ["rhbatch", *args])
    base: dict[str, str | None] = {"RUNNINGHUB_API_KEY": None, "RUNNINGHUB_BASE_URL": None}
    base.update(env)
    return CliRunner().invoke(cli, args, env=base)


# -- the resume line -------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["separate", "equals"])
def test_the_resume_line_drops_a_key_flag_and_works(style, make_sim, api_key, tmp_path,
                                                    monkeypatch):
    sim = make_sim()
    sim.account(api_key).coins = 0  # 414 at the first create: the run stops, resumable
    manifest = write_manifest(tmp_path / "m.csv", 4)
    run_dir = tmp_path / "run"
    key_args = ["--api-key", api_key] if style == "separate" else [f"--api-key={api_key}"]
    args = ["run", str(manifest), "--out", str(run_dir), *key_args, *RUN_FLAGS]
    stopped = invoke(args, {"RUNNINGHUB_BASE_URL": sim.base_url}, monkeypatch)
    assert stopped.exit_code == 3, stopped.output
    command = shlex.join(["rhbatch", "run", str(manifest), "--out", str(run_dir), *RUN_FLAGS])
    assert stopped.stderr.splitlines()[-1] == (
        "Resume with RUNNINGHUB_API_KEY set to the key (a key given as --api-key is never "
        f"printed): {command}")
    assert api_key not in stopped.stderr and "***" not in stopped.stderr
    # the printed command, run as printed with the key in the environment, finishes the run
    sim.account(api_key).coins = 10**9
    resumed = invoke(shlex.split(command)[1:], {"RUNNINGHUB_API_KEY": api_key,
                                                "RUNNINGHUB_BASE_URL": sim.base_url})
    assert resumed.exit_code == 0, resumed.output
    assert {r["status"] for r in read_results(run_dir)} == {"SUCCESS"}


def test_the_resume_line_without_a_key_flag_is_the_same_command(make_sim, api_key, tmp_path,
                                                                monkeypatch):
    sim = make_sim()
    sim.account(api_key).coins = 0
    manifest = write_manifest(tmp_path / "m.csv", 2)
    args = ["run", str(manifest), "--out", str(tmp_path / "run"), *RUN_FLAGS]
    stopped = invoke(args, {"RUNNINGHUB_API_KEY": api_key, "RUNNINGHUB_BASE_URL": sim.base_url},
                     monkeypatch)
    assert stopped.exit_code == 3, stopped.output
    command = shlex.join(["rhbatch", *args])
    assert stopped.stderr.splitlines()[-1] == f"Resume with the same command: {command}"


def test_resume_command_keeps_everything_but_the_key():
    from pipeline.progress import resume_command

    assert resume_command(["run", "m.csv", "--api-key", "k" * 32, "--out", "a b", "-q"]) == (
        "rhbatch run m.csv --out 'a b' -q", True)
    assert resume_command(["retry", "d", "--api-key=" + "k" * 32]) == ("rhbatch retry d", True)
    assert resume_command(["run", "m.csv", "--out", "d", "--", "--api-key"]) == (
        "rhbatch run m.csv --out d -- --api-key", False)


# -- 806: wrong key or wrong site ------------------------------------------------------------


@pytest.mark.parametrize(("base_url", "fix"), [
    ("https://www.runninghub.ai", "wrong key or wrong site: this key is unknown to runninghub.ai: "
     "check RUNNINGHUB_API_KEY, or for a runninghub.cn key set "
     "RUNNINGHUB_BASE_URL=https://www.runninghub.cn (or --base-url)"),
    ("https://runninghub.cn/", "wrong key or wrong site: this key is unknown to runninghub.cn: "
     "check RUNNINGHUB_API_KEY, or for a runninghub.ai key set "
     "RUNNINGHUB_BASE_URL=https://www.runninghub.ai (or --base-url)"),
    ("https://WWW.RUNNINGHUB.CN", "wrong key or wrong site: this key is unknown to runninghub.cn: "
     "check RUNNINGHUB_API_KEY, or for a runninghub.ai key set "
     "RUNNINGHUB_BASE_URL=https://www.runninghub.ai (or --base-url)"),
    ("https://runninghub.ai.example.com", BOTH_SITES),
    ("http://127.0.0.1:8000", BOTH_SITES),
    (None, BOTH_SITES),
])
def test_806_advice_names_the_other_site_of_the_base_url(base_url, fix):
    assert site_fix(base_url) == fix
    error = api_error_for(806, "APIKEY_USER_NOT_FOUND", where="create", base_url=base_url)
    assert isinstance(error, RunFatalError) and error.exit_code == 3
    assert str(error) == f"RunningHub create answered 806 APIKEY_USER_NOT_FOUND: {fix}"


def test_806_from_the_simulator_names_both_sites(make_sim, tmp_path):
    sim = make_sim(unknown_key_code=806)
    result = invoke(["account"], {"RUNNINGHUB_API_KEY": secrets.token_hex(16),
                                  "RUNNINGHUB_BASE_URL": sim.base_url})
    assert result.exit_code == 3
    assert result.stderr == (f"Error: RunningHub accountStatus answered 806 APIKEY_USER_NOT_FOUND: "
                             f"{BOTH_SITES}\n")


def test_806_on_the_cn_site_advises_the_ai_site():
    from pipeline.client import RetryPolicy, RunningHubClient
    from pipeline.config import resolve_settings

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"code": 806, "msg": "APIKEY_USER_NOT_FOUND", "data": None})

    async def read() -> None:
        settings = resolve_settings(api_key=secrets.token_hex(16),
                                    base_url="https://www.runninghub.cn", env={})
        async with RunningHubClient(settings, policy=RetryPolicy(max_attempts=1),
                                    transport=httpx.MockTransport(handler)) as client:
            await client.account_status()

    with pytest.raises(RunFatalError) as info:
        asyncio.run(read())
    assert str(info.value).endswith(site_fix("https://www.runninghub.cn"))
    assert "RUNNINGHUB_BASE_URL=https://www.runninghub.ai" in str(info.value)


# -- every filesystem error with its fix -----------------------------------------------------


@pytest.mark.parametrize(("number", "fix"), [
    (errno.ENOSPC, "free some disk space, then run the same command again to resume"),
    (errno.EDQUOT, "free some disk space, then run the same command again to resume"),
    (errno.EROFS, "make the run directory writable again (remount /r read-write) and run the same "
                  "command again, or copy the run elsewhere (cp -a /r COPY) and resume there with "
                  "--out COPY"),
    (errno.EACCES, "make the run directory writable for this user (/r) and run the same command "
                   "again, or copy the run elsewhere (cp -a /r COPY) and resume there with "
                   "--out COPY"),
    (errno.EIO, "check the disk, then run the same command again to resume"),
])
def test_each_filesystem_error_says_its_fix(number, fix):
    exc = OSError(number, __import__("os").strerror(number))
    error = st.storage_error(exc, Path("/r/results.jsonl"), Path("/r"))
    assert isinstance(error, StorageError) and error.exit_code == 3
    assert str(error) == f"Cannot write /r/results.jsonl: {exc.strerror}: {fix}"


def test_results_outside_the_run_say_where_to_write_instead(tmp_path):
    from pipeline import export

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(StorageError) as info, export.AtomicFile(blocker / "out.csv"):
        pass
    assert str(info.value) == (f"Cannot write {blocker / 'out.csv'}: File exists: choose a "
                               "writable place for it with -o FILE")


# -- a run remembers its base URL --------------------------------------------------------------


def _base_url_refused(run_dir: Path, old: str, new: str) -> str:
    return (f"Error: {run_dir} was run against {old} and this command uses {new}; the run's tasks "
            "live on that service and would look lost to this one: set RUNNINGHUB_BASE_URL (or "
            f"--base-url) back to {old}, or, if the service really moved, pass --base-url-moved "
            f"to continue the run at {new}\n")


def test_a_run_refuses_another_base_url_unless_it_moved(make_sim, api_key, tmp_path):
    first, second = make_sim(failure_rate=0.5, seed=3), make_sim()
    manifest = write_manifest(tmp_path / "m.csv", 6)
    run_dir = tmp_path / "run"
    flags = ["run", str(manifest), "--out", str(run_dir), *RUN_FLAGS]
    done = invoke(flags, {"RUNNINGHUB_API_KEY": api_key, "RUNNINGHUB_BASE_URL": first.base_url})
    assert done.exit_code == 1, done.output  # some rows failed: retry has work below
    store = st.RunStore.open(run_dir, readonly=True)
    assert store.get_meta("base_url") == first.base_url
    store.close()
    moved_env = {"RUNNINGHUB_API_KEY": api_key, "RUNNINGHUB_BASE_URL": second.base_url}
    # run and retry against another service: refused, nothing sent there, nothing requeued
    before = [(r["status"], r["attempts"]) for r in read_results(run_dir)]
    for args in (flags, ["retry", str(run_dir), *FAST_FLAGS, "-q"]):
        refused = invoke(args, moved_env)
        assert refused.exit_code == 2, refused.output
        assert refused.stderr == _base_url_refused(run_dir, first.base_url, second.base_url)
    assert second.audit.requests() == []
    assert [(r["status"], r["attempts"]) for r in read_results(run_dir)] == before
    # the same service spelled with a final slash is the same service
    same = invoke([*flags, "--base-url", first.base_url + "/"], {"RUNNINGHUB_API_KEY": api_key})
    assert same.exit_code == 1, same.output
    # --base-url-moved: accepted, recorded, said on stderr and in the log
    moved = invoke(["retry", str(run_dir), "--base-url-moved", *FAST_FLAGS, "-q"], moved_env)
    assert moved.exit_code in (0, 1), moved.output
    line = (f"base URL moved (--base-url-moved): {first.base_url} -> {second.base_url}; the run "
            f"continues at {second.base_url}")
    assert line in moved.stderr.splitlines()
    assert f"WARNING rhbatch: {line}" in (run_dir / "rhbatch.log").read_text()
    assert second.audit.requests("create")  # the retried rows went to the new service
    store = st.RunStore.open(run_dir, readonly=True)
    assert store.get_meta("base_url") == second.base_url
    store.close()
    # and now the old one is the stranger
    back = invoke(flags, {"RUNNINGHUB_API_KEY": api_key, "RUNNINGHUB_BASE_URL": first.base_url})
    assert back.exit_code == 2
    assert back.stderr == _base_url_refused(run_dir, second.base_url, first.base_url)
    again = invoke([*flags, "--base-url-moved"], {"RUNNINGHUB_API_KEY": api_key,
                                                  "RUNNINGHUB_BASE_URL": first.base_url})
    assert again.exit_code in (0, 1), again.output
    assert (f"base URL moved (--base-url-moved): {second.base_url} -> {first.base_url}; the run "
            f"continues at {first.base_url}") in again.stderr


def test_a_run_from_before_base_urls_were_kept_records_it_on_resume(make_sim, api_key, tmp_path):
    sim = make_sim()
    manifest = write_manifest(tmp_path / "m.csv", 2)
    run_dir = tmp_path / "run"
    env = {"RUNNINGHUB_API_KEY": api_key, "RUNNINGHUB_BASE_URL": sim.base_url}
    assert invoke(["run", str(manifest), "--out", str(run_dir), *RUN_FLAGS], env).exit_code == 0
    store = st.RunStore.open(run_dir)
    store.conn.execute("DELETE FROM meta WHERE key = 'base_url'")
    store.close()
    resumed = invoke(["run", str(manifest), "--out", str(run_dir), *RUN_FLAGS], env)
    assert resumed.exit_code == 0 and "base URL moved" not in resumed.stderr
    store = st.RunStore.open(run_dir, readonly=True)
    assert store.get_meta("base_url") == sim.base_url
    store.close()
