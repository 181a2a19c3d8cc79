"""The command line contract: exact messages and exit codes (0 all succeeded, 1 some failed or
unknown, 2 bad input or usage, 3 stopped), locks, disk trouble and formula-safe CSV exports."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FAST_FLAGS, TEXT2IMG, canonical, read_results, write_manifest
from kill_harness import subprocess_env

from pipeline.cli import cli

ROOT = Path(__file__).resolve().parent.parent
RUN_FLAGS = [*FAST_FLAGS, "-q", "--concurrency", "10"]


def invoke(args: list[str], env: dict[str, str | None] | None = None):
    base: dict[str, str | None] = {"RUNNINGHUB_API_KEY": None, "RUNNINGHUB_BASE_URL": None}
    base.update(env or {})
    return CliRunner().invoke(cli, args, env=base)


def sim_env(sim, key: str) -> dict[str, str | None]:
    return {"RUNNINGHUB_API_KEY": key, "RUNNINGHUB_BASE_URL": sim.base_url}


# -- settings --------------------------------------------------------------------------------


def test_missing_key_is_exit_2_with_the_fix(make_sim, tmp_path):
    sim = make_sim()
    manifest = write_manifest(tmp_path / "m.csv", 2)
    result = invoke(["run", str(manifest), "--out", str(tmp_path / "run")],
                    {"RUNNINGHUB_BASE_URL": sim.base_url})
    assert result.exit_code == 2
    assert result.stderr == "Error: No API key: set RUNNINGHUB_API_KEY or pass --api-key\n"
    assert sim.audit.requests() == []
    assert not (tmp_path / "run" / "state.db").exists()


@pytest.mark.parametrize("url", ["ftp://runninghub.ai", "www.runninghub.ai", "https://"])
def test_bad_base_url_is_exit_2(url, api_key, tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", 2)
    result = invoke(["run", str(manifest), "--out", str(tmp_path / "run"), "--base-url", url],
                    {"RUNNINGHUB_API_KEY": api_key})
    assert result.exit_code == 2
    shown = url.rstrip("/")
    assert result.stderr == (
        f"Error: Base URL {shown!r} is not an http(s) URL: set RUNNINGHUB_BASE_URL or --base-url "
        "to e.g. https://www.runninghub.ai\n")


def test_an_unparsable_base_url_is_exit_2(api_key, tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", 2)
    result = invoke(["run", str(manifest), "--out", str(tmp_path / "run"), "--base-url",
                     "http://[::1"], {"RUNNINGHUB_API_KEY": api_key})
    assert result.exit_code == 2
    assert "is not an http(s) URL" in result.stderr


def test_a_malformed_key_is_exit_2_and_not_echoed(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", 2)
    result = invoke(["run", str(manifest), "--out", str(tmp_path / "run")],
                    {"RUNNINGHUB_API_KEY": "my key!"})
    assert result.exit_code == 2
    assert result.stderr == (
        "Error: The API key in RUNNINGHUB_API_KEY does not look like a RunningHub key (32 letters "
        "and digits): copy it again from the RunningHub console\n")


@pytest.mark.parametrize("value", ["0", "-3", "5001"])
def test_bad_concurrency_is_exit_2(value, api_key, tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", 2)
    result = invoke(["run", str(manifest), "--out", str(tmp_path / "run"), "--concurrency", value],
                    {"RUNNINGHUB_API_KEY": api_key})
    assert result.exit_code == 2
    assert result.stderr == (
        f"Error: --concurrency must be a whole number from 1 to 5000, not {int(value)}\n")


def test_non_numeric_concurrency_is_a_click_usage_error(api_key, tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", 2)
    result = invoke(["run", str(manifest), "--out", str(tmp_path / "run"), "--concurrency", "ten"],
                    {"RUNNINGHUB_API_KEY": api_key})
    assert result.exit_code == 2
    assert "Invalid value for '--concurrency': 'ten' is not a valid integer." in result.stderr


def test_unreachable_service_during_preflight_is_exit_3_with_the_fix(api_key, tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    manifest = write_manifest(tmp_path / "m.csv", 2)
    result = invoke(["run", str(manifest), "--out", str(tmp_path / "run"), "--base-url",
                     f"http://127.0.0.1:{port}", *FAST_FLAGS], {"RUNNINGHUB_API_KEY": api_key})
    assert result.exit_code == 3, result.output
    assert "RunningHub is unreachable" in result.stderr
    assert "run the same command again to resume" in result.stderr


# -- validate --------------------------------------------------------------------------------


def test_validate_says_an_output_manifests_inputs_are_the_earlier_runs_metadata(tmp_path):
    records = [{"row": i + 1, "row_id": f"r{i}", "workflowId": TEXT2IMG,
                "inputs": {"6.text": text, "note": "kept"}, "options": {},
                "nodeInfoList": [{"nodeId": "6", "fieldName": "text", "fieldValue": text}],
                "status": "SUCCESS", "taskId": str(100 + i)}
               for i, text in enumerate(["a cat", "a dog"])]
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    workflow = ROOT / "pipeline" / "sim" / "workflows" / "text2img.json"
    for strict in ([], ["--strict"]):  # they are not columns that feed no node: --strict agrees
        result = invoke(["validate", str(results), "--workflow-json", str(workflow), *strict])
        assert result.exit_code == 0, result.output
        assert result.stdout == (
            f"{results}: 2 rows OK, workflow {TEXT2IMG}\n"
            "  preflight: every node id, field and value type matches the workflow\n"
            "  catalogue: rhbatch core nodes (29 classes): 1 field checked against the node "
            "catalogue (2 values)\n"
            "  6.text, note: the earlier run's inputs, kept as metadata (each row sends the exact "
            "nodeInfoList it recorded)\n")


# -- dry run ---------------------------------------------------------------------------------


def test_dry_run_prints_the_exact_bodies_needs_no_key_and_sends_nothing(make_sim, tmp_path):
    sim = make_sim()
    manifest = write_manifest(tmp_path / "m.csv", 3)
    out = tmp_path / "run"
    result = invoke(["run", str(manifest), "--out", str(out), "--dry-run",
                     "--instance-type", "plus"], {"RUNNINGHUB_BASE_URL": sim.base_url})
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["row"] for line in lines] == [1, 2, 3]
    assert lines[1]["body"] == {
        "workflowId": TEXT2IMG,
        "nodeInfoList": [
            {"nodeId": "6", "fieldName": "text", "fieldValue": "prompt number 0"},
            {"nodeId": "3", "fieldName": "seed", "fieldValue": 1},
            {"nodeId": "3", "fieldName": "cfg", "fieldValue": 7.0},
        ],
        "instanceType": "plus",
    }
    assert all("apiKey" not in line["body"] for line in lines)
    assert result.stderr.endswith("Dry run: 3 request bodies printed, nothing sent.\n")
    assert sim.audit.requests() == []
    assert not (out / "state.db").exists()


# -- a finished run: status, export, exit codes ----------------------------------------------


@pytest.fixture
def finished(make_sim, api_key, tmp_path):
    """A 30-row run where some tasks failed (805): (sim, key, run_dir, result)."""
    sim = make_sim(failure_rate=0.3, seed=4)
    manifest = tmp_path / "m.csv"
    with manifest.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["workflowId", "6.text", "3.seed", "3.cfg"])
        for i in range(30):
            writer.writerow([TEXT2IMG, f"prompt {i % 3}", i, [5.0, 7.0, 9.0][i % 3]])
    run_dir = tmp_path / "run"
    result = invoke(["run", str(manifest), "--out", str(run_dir), *RUN_FLAGS],
                    sim_env(sim, api_key))
    return sim, api_key, run_dir, result


def test_exit_1_when_some_rows_failed_then_status_and_export(finished, tmp_path):
    sim, key, run_dir, result = finished
    assert result.exit_code == 1, result.output
    records = read_results(run_dir)
    counts = Counter(r["status"] for r in records)
    assert set(counts) == {"SUCCESS", "FAILED"} and counts["FAILED"] >= 3
    assert f"30 rows: {counts['SUCCESS']} SUCCESS, {counts['FAILED']} FAILED." in result.stderr
    status = invoke(["status", str(run_dir)])
    assert status.exit_code == 0
    lines = status.stdout.splitlines()
    assert lines[0].startswith(f"{run_dir}: 30 rows from ")
    assert f"  SUCCESS         {counts['SUCCESS']}" in lines
    assert f"  FAILED          {counts['FAILED']}" in lines
    as_json = json.loads(invoke(["status", str(run_dir), "--json"]).stdout)
    assert as_json["total"] == 30 and as_json["counts"]["FAILED"] == counts["FAILED"]
    for fmt in ("csv", "jsonl", "parquet"):
        target = tmp_path / f"out.{fmt}"
        exported = invoke(["export", str(run_dir), "--format", fmt, "-o", str(target)])
        assert exported.exit_code == 0
        assert exported.stderr == f"Wrote 30 rows to {target}\n"
    exported_lines = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line)["row_id"] for line in exported_lines] == [
        r["row_id"] for r in records]
    missing = invoke(["status", str(tmp_path)])
    assert missing.exit_code == 2
    assert "holds no rhbatch run (no state.db): check the path" in missing.stderr


def test_retry_selectors(finished):
    sim, key, run_dir, _ = finished
    records = read_results(run_dir)
    failed = [r for r in records if r["status"] == "FAILED"]
    high_cfg_failed = [r for r in failed if r["inputs"]["3.cfg"] >= 7]

    by_row = {r["row_id"]: r for r in records}

    def count(*args: str) -> int:
        res = invoke(["retry", str(run_dir), "--dry-run", *args])
        assert res.exit_code == 0, res.output
        planned = [json.loads(line) for line in res.stdout.splitlines()]
        for item in planned:  # the exact body a retry would send: what the row sent before
            assert item["body"]["nodeInfoList"] == by_row[item["row_id"]]["nodeInfoList"]
            assert item["status"] == by_row[item["row_id"]]["status"]
        assert f"Dry run: {len(planned)} row(s) would be retried" in res.stderr
        return len(planned)

    assert count() == len(failed)
    assert count("--status", "FAILED") == len(failed)
    assert count("--status", "SUCCESS") == 30 - len(failed)
    assert count("--code", "805") == len(failed)
    assert count("--code", "433") == 0
    assert count("--class", "task_failed") + count("--class", "oom") == len(failed)
    assert count("--where", "`3.cfg` >= 7") == len(high_cfg_failed)
    assert count("--status", "SUCCESS", "--where", "`3.cfg` >= 7 and status == 'SUCCESS'") == len(
        [r for r in records if r["status"] == "SUCCESS" and r["inputs"]["3.cfg"] >= 7])

    bad_class = invoke(["retry", str(run_dir), "--dry-run", "--class", "gremlins"])
    assert bad_class.exit_code == 2
    assert ("--class 'gremlins' is not a failure class: use one of task_failed, row_fatal, "
            "task_gone, oom, cancelled, unknown") in bad_class.stderr
    bad_where = invoke(["retry", str(run_dir), "--dry-run", "--where", "3.cfg >= 7"])
    assert bad_where.exit_code == 2
    assert "could not be evaluated" in bad_where.stderr
    assert "(put names like `3.cfg` in backticks)" in bad_where.stderr
    unknown = invoke(["retry", str(run_dir), "--unknown"], sim_env(sim, key))
    assert unknown.exit_code == 2
    assert unknown.stderr == (
        "Error: SUBMIT_UNKNOWN rows may already have run and been billed: check RunningHub's call "
        "records, then add --accept-double-pay to resubmit them\n")
    no_key = invoke(["retry", str(run_dir)])
    assert no_key.exit_code == 2 and "No API key" in no_key.stderr

    before = len(sim.audit.tasks())
    sim.config.failure_rate = 0.0  # a retry now succeeds: every retried row must end SUCCESS
    again = invoke(["retry", str(run_dir), "--where", "`3.cfg` >= 7", *FAST_FLAGS, "-q"],
                   sim_env(sim, key))
    left_failed = [r for r in failed if r["inputs"]["3.cfg"] < 7]  # not selected: still FAILED
    assert high_cfg_failed and left_failed  # the selection leaves some out (seed 4)
    assert again.exit_code == 1, again.output  # the rows left out still failed
    assert f"Retried {len(high_cfg_failed)} row(s)" in again.stderr
    assert f"30 rows: {30 - len(left_failed)} SUCCESS, {len(left_failed)} FAILED." in again.stderr
    assert len(sim.audit.tasks()) == before + len(high_cfg_failed)
    after = {r["row_id"]: r for r in read_results(run_dir)}
    for record in high_cfg_failed:
        assert after[record["row_id"]]["attempts"] == 2
        assert after[record["row_id"]]["status"] == "SUCCESS"
        assert after[record["row_id"]]["taskId"] != record["taskId"]
    for record in left_failed:
        assert after[record["row_id"]] == record  # untouched, attempt and all


def test_exit_0_when_every_row_succeeded_and_3_when_the_wallet_is_empty(make_sim, api_key,
                                                                        tmp_path):
    sim = make_sim()
    manifest = write_manifest(tmp_path / "m.csv", 5)
    ok = invoke(["run", str(manifest), "--out", str(tmp_path / "ok"), *RUN_FLAGS],
                sim_env(sim, api_key))
    assert ok.exit_code == 0, ok.output
    assert "5 rows: 5 SUCCESS." in ok.stderr
    sim.account(api_key).coins = 0
    other = write_manifest(tmp_path / "other.csv", 6)
    broke = invoke(["run", str(other), "--out", str(tmp_path / "broke"), *RUN_FLAGS],
                   sim_env(sim, api_key))
    assert broke.exit_code == 3, broke.output
    assert "414" in broke.stderr and "top up the account's API balance" in broke.stderr
    assert "Resume with the same command: " in broke.stderr


# -- CSV export is safe to open in a spreadsheet ---------------------------------------------


def test_csv_export_neutralises_formulas_but_keeps_numbers_and_exact_json(make_sim, api_key,
                                                                         tmp_path):
    sim = make_sim()
    texts = ["=HYPERLINK(\"http://evil\")", "+SUM(A1:A9)", "@cmd", "-rm -rf", "-5", "+3.5",
             "plain"]
    manifest = tmp_path / "m.jsonl"
    with manifest.open("w", encoding="utf-8") as fh:
        for i, text in enumerate(texts):
            fh.write(json.dumps({"row_id": f"r{i}", "workflowId": TEXT2IMG, "6.text": text,
                                 "3.seed": i, "note": text, "offset": -5}) + "\n")
    run_dir = tmp_path / "run"
    result = invoke(["run", str(manifest), "--out", str(run_dir), *RUN_FLAGS],
                    sim_env(sim, api_key))
    assert result.exit_code == 0, result.output
    target = tmp_path / "out.csv"
    assert invoke(["export", str(run_dir), "--format", "csv", "-o", str(target)]).exit_code == 0
    with target.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    expected = ["'=HYPERLINK(\"http://evil\")", "'+SUM(A1:A9)", "'@cmd", "'-rm -rf", "-5", "+3.5",
                "plain"]
    assert [r["inputs.6.text"] for r in rows] == expected
    assert [r["inputs.note"] for r in rows] == expected
    assert {r["inputs.offset"] for r in rows} == {"-5"}
    sent = {t["taskId"]: t for t in sim.audit.tasks()}
    for row, text in zip(rows, texts, strict=True):
        nli = json.loads(row["nodeInfoList"])  # the JSON column keeps the exact values
        assert {(i["nodeId"], i["fieldName"]): i["fieldValue"] for i in nli}[("6", "text")] == text
        assert canonical(nli) == canonical(sent[row["taskId"]]["nodeInfoList"])
    # results.csv written by the run itself follows the same rule
    with (run_dir / "results.csv").open(encoding="utf-8", newline="") as fh:
        assert [r["inputs.6.text"] for r in csv.DictReader(fh)] == expected


# -- two runs, one directory -----------------------------------------------------------------


def _wait_for(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.skipif(sys.platform != "linux", reason="uses SIGKILL and flock")
@pytest.mark.timeout(90)
def test_a_second_run_is_refused_and_a_killed_runs_lock_does_not_block_resume(make_sim, api_key,
                                                                             tmp_path):
    sim = make_sim(time_scale=50.0, concurrency=50)  # room for the killed run's live tasks
    manifest = write_manifest(tmp_path / "m.csv", 20)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(manifest), "--out", str(run_dir),
         "--concurrency", "5", *FAST_FLAGS, "-q"],
        env=subprocess_env(sim.base_url, api_key), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: len(sim.audit.tasks()) >= 2)
        second = invoke(["run", str(manifest), "--out", str(run_dir), *RUN_FLAGS],
                        sim_env(sim, api_key))
        assert second.exit_code == 2, second.output
        assert second.stderr == (
            f"Error: {run_dir} is being run by process {proc.pid}: wait for it to finish, or stop "
            "it (Ctrl-C) and run the same command again to resume\n")
        retry = invoke(["retry", str(run_dir), "--unknown", "--accept-double-pay"],
                       sim_env(sim, api_key))
        assert retry.exit_code == 2 and "is being run by process" in retry.stderr
        # status and export read while it runs
        assert invoke(["status", str(run_dir)]).exit_code == 0
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert (run_dir / ".lock").exists()  # the stale lock file stays; the kernel dropped the lock
    resumed = invoke(["run", str(manifest), "--out", str(run_dir), *RUN_FLAGS],
                     sim_env(sim, api_key))
    assert resumed.exit_code in (0, 1), resumed.output
    assert "Resuming 20 rows" in resumed.stderr
    records = read_results(run_dir)
    assert {r["status"] for r in records} <= {"SUCCESS", "SUBMIT_UNKNOWN"}
    assert sim.audit.duplicate_creates() == {}


# -- disk trouble ----------------------------------------------------------------------------


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True)
    return done.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    if sys.platform != "linux" or os.geteuid() != 0 or not _mount_tmpfs(mount, "4m"):
        pytest.skip("needs root and `mount -t tmpfs` (a real small filesystem to fill or make "
                    "read-only mid-run; as root, permissions alone do not stop writes)")
    try:
        yield mount
    finally:
        _umount(mount)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("trouble", ["full", "read-only"])
def test_disk_trouble_mid_run_is_exit_3_with_the_fix_and_the_run_resumes(trouble, small_disk,
                                                                         make_sim, api_key,
                                                                         tmp_path):
    sim = make_sim(time_scale=40.0, concurrency=50)
    manifest = write_manifest(tmp_path / "m.csv", 40)
    run_dir = small_disk / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(manifest), "--out", str(run_dir),
         "--concurrency", "5", *FAST_FLAGS, "-q"],
        env=subprocess_env(sim.base_url, api_key), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    ballast = small_disk / "ballast"
    try:
        _wait_for(lambda: len(sim.audit.tasks()) >= 8)
        if trouble == "full":
            with ballast.open("wb") as fh:
                try:
                    while True:
                        fh.write(b"\0" * 65536)
                        fh.flush()
                except OSError:
                    pass
        else:
            # a read-only bind of the run directory: the files rhbatch opens from now on cannot
            # be written (a plain remount is refused while the database is open for writing)
            subprocess.run(["mount", "--bind", str(run_dir), str(run_dir)], check=True)
            subprocess.run(["mount", "-o", "remount,ro,bind", str(run_dir)], check=True)
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 3, err[-3000:]
    # the trouble reaches the user once, with its fix: one Error line, no repeat, no traceback
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, err[-3000:]
    if trouble == "full":
        assert errors[0].endswith(": free some disk space, then run the same command again to "
                                  "resume"), err[-3000:]
        assert err.count("free some disk space") == 1, err[-3000:]
    else:
        assert errors[0] == (
            f"Error: The run directory {run_dir} is not writable any more while the run was "
            "going: rhbatch stopped at once; restore it (or make it writable) and run the same "
            "command to resume; tasks already created are polled, never resent"), err[-3000:]
    assert "Traceback" not in err and "Logging error" not in err
    if trouble == "read-only":
        # resuming while it is still read-only says so once, with both ways out
        again = invoke(["run", str(manifest), "--out", str(run_dir), *RUN_FLAGS],
                       sim_env(sim, api_key))
        assert again.exit_code == 3, again.output
        assert again.stderr == (
            f"Error: Cannot open {run_dir}/.lock: Read-only file system: make the run directory "
            f"writable again (remount {run_dir} read-write) and run the same command again, or "
            f"copy the run elsewhere (cp -a {run_dir} COPY) and resume there with --out COPY\n")
        # the second way out works: a copy of the run resumes elsewhere without paying twice
        copy = tmp_path / "copy"
        subprocess.run(["cp", "-a", str(run_dir), str(copy)], check=True)
        _umount(run_dir)
        run_dir = copy
    else:  # free the space, then the same command finishes the run without paying twice
        ballast.unlink()
    resumed = invoke(["run", str(manifest), "--out", str(run_dir), *RUN_FLAGS],
                     sim_env(sim, api_key))
    assert resumed.exit_code in (0, 1), resumed.output
    records = read_results(run_dir)
    assert len(records) == 40
    assert {r["status"] for r in records} <= {"SUCCESS", "SUBMIT_UNKNOWN"}
    assert sum(r["status"] == "SUBMIT_UNKNOWN" for r in records) <= 1
    assert sim.audit.duplicate_creates() == {}
    tasks = {t["taskId"]: t for t in sim.audit.tasks()}
    for record in records:
        if record["status"] == "SUCCESS":
            assert canonical(tasks[record["taskId"]]["nodeInfoList"]) == canonical(
                record["nodeInfoList"])


def test_an_export_that_cannot_be_written_says_where_to_write_instead(tmp_path):
    from pipeline import store as st
    from pipeline.manifest import make_row

    run = st.RunStore.open(tmp_path / "run", create=True)
    run.insert_rows([make_row(0, 1, "r0", TEXT2IMG, [{"nodeId": "3", "fieldName": "seed",
                                                       "fieldValue": 1}])])
    run.close()
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    target = blocker / "results.jsonl"
    result = invoke(["export", str(tmp_path / "run"), "-o", str(target)])
    assert result.exit_code == 3, result.output
    assert result.stderr == (f"Error: Cannot write {target}: File exists: choose a writable place "
                             "for it with -o FILE\n")
    assert blocker.read_text() == "x"


# -- sweep -------------------------------------------------------------------------------------


def test_sweep_prints_rows_and_expected_coins_from_an_earlier_run(tmp_path):
    from pipeline import store as st
    from pipeline.manifest import make_row

    earlier = st.RunStore.open(tmp_path / "earlier", create=True)
    earlier.insert_rows(make_row(i, i + 1, f"r{i}", "1904136902449209346",
                                 [{"nodeId": "3", "fieldName": "seed", "fieldValue": i}])
                        for i in range(3))
    for i, coins in enumerate((4.0, 6.0)):
        earlier.mark_submitting(i)
        earlier.mark_submitted(i, str(100 + i), st.RUNNING, 1.0)
        earlier.mark_success(i, [{"fileUrl": "http://x", "consumeCoins": coins}], 2.0)
    earlier.close()
    spec = tmp_path / "spec.yaml"
    spec.write_text('workflowId: "1904136902449209346"\nbindings: {seed: "3.seed"}\n'
                    "axes: {seed: {range: [0, 30]}}\n", encoding="utf-8")
    result = invoke(["sweep", str(spec), "-o", str(tmp_path / "m.csv"), "--cost-from",
                     str(tmp_path / "earlier")])
    assert result.exit_code == 0, result.output
    assert f"{spec}: 30 rows\n" in result.stderr
    assert "expected about 150 coins (5 per task, measured in" in result.stderr
    assert result.stdout == f"Wrote 30 rows to {tmp_path / 'm.csv'}\n"


def test_sweep_past_max_rows_is_refused_without_a_terminal_and_writes_nothing(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text('workflowId: "1904136902449209346"\nbindings: {seed: "3.seed"}\n'
                    "axes: {seed: {range: [0, 30]}}\n", encoding="utf-8")
    result = invoke(["sweep", str(spec), "-o", str(tmp_path / "m.csv"), "--max-rows", "10"])
    assert result.exit_code == 2
    assert "the sweep expands to 30 rows, more than the limit of 10; pass --max-rows 30 (or " \
           "--yes) to write them" in result.stderr
    assert not (tmp_path / "m.csv").exists()


def test_the_simulator_is_loaded_only_for_the_sim_command():
    probe = ("import sys; from pipeline.cli import cli; "
             "print(sorted(m for m in ('aiohttp', 'pipeline.sim') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60, env={k: v for k, v in os.environ.items()
                                             if k != "RUNNINGHUB_API_KEY"})
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.strip() == "[]"
    listed = CliRunner().invoke(cli, ["--help"])
    assert listed.exit_code == 0 and "  sim " in listed.output
    helped = CliRunner().invoke(cli, ["sim", "--help"])
    assert helped.exit_code == 0 and "--config" in helped.output


# -- errors that are not rhbatch's own -------------------------------------------------------


def test_an_unexpected_error_in_a_run_is_one_line_naming_the_log_with_its_traceback(
        make_sim, api_key, tmp_path, monkeypatch):
    from pipeline import runner

    async def broken(self):
        raise KeyError("a bug")

    monkeypatch.setattr(runner.Runner, "run", broken)  # a bug inside the run: not an RhbatchError
    sim = make_sim()
    manifest = write_manifest(tmp_path / "m.csv", 2)
    run_dir = tmp_path / "run"
    result = invoke(["run", str(manifest), "--out", str(run_dir), *RUN_FLAGS], sim_env(sim, api_key))
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        f"Error: unexpected KeyError: 'a bug' (the traceback is in {run_dir / 'rhbatch.log'}); "
        "this is a bug in rhbatch, please report it")
    assert "Traceback" not in result.stderr
    log = (run_dir / "rhbatch.log").read_text(encoding="utf-8")
    assert "rhbatch stopped on an unexpected error: 'a bug'" in log
    assert "Traceback (most recent call last):" in log and "KeyError: 'a bug'" in log


_BROKEN_STATUS = """
import sys
import pipeline.status
def broken(*args, **kwargs):
    raise ZeroDivisionError("a bug in status")
pipeline.status.run_status = broken
from pipeline.cli import main
sys.argv = ["rhbatch", "status", sys.argv[1]]
main()
"""


@pytest.mark.parametrize("debug", [None, "1"])
def test_rhbatch_debug_shows_the_traceback_of_an_unexpected_error(debug, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNNINGHUB_", "RHBATCH_"))}
    env["PYTHONPATH"] = str(ROOT)
    if debug:
        env["RHBATCH_DEBUG"] = debug
    done = subprocess.run([sys.executable, "-c", _BROKEN_STATUS, str(tmp_path)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 1
    if debug:
        assert "Traceback (most recent call last):" in done.stderr
        assert done.stderr.splitlines()[-1] == "ZeroDivisionError: a bug in status"
    else:
        assert done.stderr == (
            "Error: unexpected ZeroDivisionError: a bug in status (run with RHBATCH_DEBUG=1 for "
            "the traceback); this is a bug in rhbatch, please report it\n")


def test_verbose_logs_to_stderr_only_while_its_command_runs(make_sim, api_key, tmp_path):
    import logging

    logger = logging.getLogger("rhbatch")
    handlers, level = list(logger.handlers), logger.level
    sim = make_sim()
    first = invoke(["run", str(write_manifest(tmp_path / "a.csv", 2)), "--out", str(tmp_path / "a"),
                    "-v", *RUN_FLAGS], sim_env(sim, api_key))
    assert first.exit_code == 0, first.output
    assert "INFO rhbatch: run ended:" in first.stderr
    assert logger.handlers == handlers and logger.level == level
    second = invoke(["run", str(write_manifest(tmp_path / "b.csv", 3)), "--out", str(tmp_path / "b"),
                     *RUN_FLAGS], sim_env(sim, api_key))
    assert second.exit_code == 0, second.output
    assert "INFO rhbatch" not in second.stderr  # the first command's handler is gone
