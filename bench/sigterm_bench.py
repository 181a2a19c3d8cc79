"""SIGTERM on a half-done run: how long ``rhbatch run`` takes to exit, and whether the results
files it leaves are complete and current.

    python bench/sigterm_bench.py                     # 1,000,000 rows (several minutes to build)
    python bench/sigterm_bench.py --rows 20000        # quick
    python bench/sigterm_bench.py --cold              # no results files from an earlier session
    python bench/sigterm_bench.py --save DIR          # keep the prepared run (before rhbatch starts)
    python bench/sigterm_bench.py --reuse DIR         # start from a run kept with --save
    python bench/sigterm_bench.py --reuse DIR --keep-results   # ... and the results it holds
    python bench/sigterm_bench.py --profile exit.txt  # py-spy (wall clock) from SIGTERM to exit

The run is built like ``bench/run_bench.py``'s ``resume`` section (``build_half_done``: the
manifest's run made with ``open_run``, every other row set to SUCCESS by SQL). Then, unless
``--cold``, its results files are written the way the session that left it half done would have
written them on its way out (``ResultsFlusher.finish``: a whole rewrite, there being no index yet;
timed, it is also the cost of one full rewrite). ``rhbatch run`` is started against the simulator
in its own process (``bench/simproc.py``; tasks last an hour so they stay live), SIGTERM is sent
once ``--creates`` creates have been answered, and the bench waits for the exit.

"complete" means both files hold one parseable record per row, in input order; "current" means
each record's status and task id are those in ``state.db`` when rhbatch exited.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import SimProcess, api_key, sim_config, write_manifest  # noqa: E402
from run_bench import build_half_done  # noqa: E402

EXIT_TARGET_S = 5.0
START_TIMEOUT_S = 600.0


def write_results_as_a_session_would(run_dir: Path) -> float:
    """The results files of the run as its last session left them on its way out (with their
    index, where this rhbatch keeps one: ``ResultsFlusher.finish``); returns the seconds taken."""
    from pipeline import export
    from pipeline.store import RunStore

    started = time.perf_counter()
    store = RunStore.open(run_dir)
    try:
        try:
            from pipeline.refresh import ResultsFlusher
        except ImportError:
            export.write_results(store)
        else:
            ResultsFlusher(store, 10.0).finish(store)
    finally:
        store.close()
    return time.perf_counter() - started


def start_profile(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy attached to ``pid`` (every thread, idle frames kept: the exit's wall clock)."""
    spy_bin = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    fmt = "speedscope" if out.suffix == ".json" else "raw"  # speedscope keeps the samples' order
    spy = subprocess.Popen([spy_bin, "record", "--pid", str(pid), "--rate", "250", "--idle",
                            "--threads", "--format", fmt, "--output", str(out), "--nonblocking"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached before the signal
    return spy


def cpu_s(pid: int) -> float:
    """User + system CPU of ``pid`` so far, its threads and the children it waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")  # utime..cstime


def stored_state(run_dir: Path) -> list[tuple[str, str, str | None]]:
    conn = sqlite3.connect(f"file:{run_dir / 'state.db'}?mode=ro", uri=True)
    try:
        return [(r[0], r[1], r[2]) for r in
                conn.execute("SELECT row_id, status, task_id FROM rows ORDER BY idx")]
    finally:
        conn.close()


def check_jsonl(path: Path, stored: list[tuple[str, str, str | None]]) -> dict[str, Any]:
    if not path.exists():
        return {"complete": False, "why": "missing", "stale": None}
    count = stale = 0
    try:
        with path.open(encoding="utf-8") as fh:
            for count, line in enumerate(fh, start=1):
                record = json.loads(line)
                if count <= len(stored):
                    row_id, status, task_id = stored[count - 1]
                    if (record["row_id"], record["status"], record["taskId"]) != (
                            row_id, status, task_id):
                        stale += 1
    except (ValueError, KeyError) as exc:
        return {"complete": False, "why": f"line {count + 1}: {exc}", "stale": stale}
    return {"complete": count == len(stored), "why": f"{count:,} records", "stale": stale}


def check_csv(path: Path, stored: list[tuple[str, str, str | None]]) -> dict[str, Any]:
    if not path.exists():
        return {"complete": False, "why": "missing", "stale": None}
    count = stale = 0
    csv.field_size_limit(1 << 30)
    with path.open(encoding="utf-8", newline="") as fh:
        for count, record in enumerate(csv.DictReader(fh), start=1):
            if count <= len(stored):
                row_id, status, task_id = stored[count - 1]
                if (record["row_id"], record["status"], record["taskId"] or None) != (
                        row_id, status, task_id):
                    stale += 1
    return {"complete": count == len(stored), "why": f"{count:,} records", "stale": stale}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--creates", type=int, default=20,
                        help="creates answered before SIGTERM (default: 20)")
    parser.add_argument("--at-least-s", type=float, default=0.0,
                        help="and not before this many seconds after the start (default: 0; 11 "
                             "lands in the first refresh during the run)")
    parser.add_argument("--cold", action="store_true",
                        help="no results files from an earlier session (default: written)")
    parser.add_argument("--workdir", type=Path, help="keep the run here (default: a temp dir)")
    parser.add_argument("--save", type=Path, help="copy the prepared run directory here")
    parser.add_argument("--reuse", type=Path, help="start from a run directory kept with --save")
    parser.add_argument("--keep-results", action="store_true",
                        help="with --reuse: keep its results files (default: written again)")
    parser.add_argument("--profile", type=Path,
                        help="record the exit with py-spy here (idle frames kept; raw stacks, or "
                             "speedscope for a name ending .json)")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rhbatch-sigterm-"))
    workdir.mkdir(parents=True, exist_ok=True)
    manifest = write_manifest(workdir / f"m-{args.rows}.csv", args.rows)  # the same bytes each time
    run_dir = workdir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    if args.reuse:
        shutil.copytree(args.reuse, run_dir, symlinks=True)
        print(f"copied the prepared run from {args.reuse}", flush=True)
    else:
        build_s = build_half_done(manifest, run_dir)
        print(f"built a half-done {args.rows:,}-row run in {build_s:.1f}s", flush=True)
    if args.cold or not args.keep_results:
        for path in run_dir.glob("*results*"):
            path.unlink()
    if not args.cold and not (run_dir / "results.jsonl").exists():
        full_s = write_results_as_a_session_would(run_dir)
        sizes = ", ".join(f"{name} {(run_dir / name).stat().st_size / 1e6:,.0f} MB"
                          for name in ("results.jsonl", "results.csv"))
        print(f"results written as the last session would: {full_s:.1f}s ({sizes})", flush=True)
    if args.save:
        shutil.rmtree(args.save, ignore_errors=True)
        shutil.copytree(run_dir, args.save, symlinks=True)
    os.sync()  # the copy's writeback (GBs) would otherwise land in the exit being measured
    config = sim_config(concurrency=50, duration_s=3600.0, time_scale=1.0)
    with SimProcess(workdir, config) as sim:
        env = dict(os.environ, RUNNINGHUB_API_KEY=api_key(), RUNNINGHUB_BASE_URL=sim.base_url)
        argv_run = [sys.executable, "-m", "pipeline", "run", str(manifest), "--out", str(run_dir),
                    "--concurrency", "50", "-q"]
        started = time.monotonic()
        proc = subprocess.Popen(argv_run, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        try:
            while proc.poll() is None and time.monotonic() - started < START_TIMEOUT_S:
                if (sim.ask("summary")["tasks"] >= args.creates
                        and time.monotonic() - started >= args.at_least_s):
                    break
                time.sleep(0.05)
            first_creates_s = time.monotonic() - started
            spy = start_profile(proc.pid, args.profile) if args.profile else None
            cpu_before = cpu_s(proc.pid)
            signalled = time.monotonic()
            print(f"SIGTERM sent at {time.strftime('%H:%M:%S')}.{int(time.time() % 1 * 1000):03d}",
                  flush=True)
            proc.send_signal(signal.SIGTERM)
            assert proc.stderr is not None
            err = proc.stderr.read()  # until the child exits; then reaped here for its rusage
            _, status, usage = os.wait4(proc.pid, 0)
            exit_s = time.monotonic() - signalled
            proc.returncode = os.waitstatus_to_exitcode(status)
            exit_cpu_s = usage.ru_utime + usage.ru_stime - cpu_before
            if spy is not None:
                spy.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stored = stored_state(run_dir)
    jsonl = check_jsonl(run_dir / "results.jsonl", stored)
    csv_check = check_csv(run_dir / "results.csv", stored)
    print(f"rhbatch run: start -> {args.creates} creates {first_creates_s:.2f}s")
    print(f"SIGTERM -> exit: {exit_s:.2f}s (exit code {proc.returncode}; target < "
          f"{EXIT_TARGET_S:g}s: {'met' if exit_s < EXIT_TARGET_S else 'NOT met'}); CPU (user+sys) "
          f"of rhbatch in it {exit_cpu_s:.2f}s")
    for name, found in (("results.jsonl", jsonl), ("results.csv", csv_check)):
        print(f"{name}: complete {found['complete']} ({found['why']}), records not current: "
              f"{found['stale']}")
    if proc.returncode != 3:
        print(err[-2000:], file=sys.stderr)
    ok = (exit_s < EXIT_TARGET_S and jsonl["complete"] and csv_check["complete"]
          and jsonl["stale"] == 0 and csv_check["stale"] == 0)
    print(f"workdir: {workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
