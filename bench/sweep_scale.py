"""Time and peak memory of expanding a large sweep (default: 1,000 prompts x 1,000 seeds = 1M rows).

    python bench/sweep_scale.py                       # all three formats, 1000 x 1000
    python bench/sweep_scale.py --prompts 200 --seeds 500 --format csv

Each format runs in a fresh child process so its peak RSS (``resource.getrusage``, ``ru_maxrss``)
is its own, not the maximum of everything this script did before. (Linux carries ru_maxrss over
fork+exec, so this holds because the parent stays small: it never imports pyarrow or pandas.)
The budget is 500 MB per run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEAK_RSS_BUDGET_MB = 500
FORMATS = ("csv", "jsonl", "parquet")


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def write_spec(workdir: Path, prompts: int, seeds: int) -> Path:
    (workdir / "prompts.txt").write_text(
        "".join(f"a photo of subject {i}, studio light, 35mm\n" for i in range(prompts)),
        encoding="utf-8",
    )
    spec = {
        "workflowId": "1904136902449209346",
        "bindings": {"prompt": "6.text", "seed": "3.seed", "cfg": "3.cfg", "steps": "3.steps"},
        "constants": {"cfg": 7.0, "steps": 20, "study": "scale"},
        "axes": {"product": [{"prompt": {"file": "prompts.txt"}}, {"seed": {"range": [0, seeds]}}]},
    }
    path = workdir / "sweep.json"
    path.write_text(json.dumps(spec, indent=2), encoding="utf-8")
    return path


def run_one(spec: Path, out: Path) -> dict[str, float | int]:
    sys.path.insert(0, str(ROOT))
    from pipeline.sweep import expand_sweep

    start = time.perf_counter()
    result = expand_sweep(spec, out, force=True)
    seconds = time.perf_counter() - start
    return {
        "rows": result.rows,
        "seconds": round(seconds, 2),
        "rows_per_s": round(result.rows / seconds),
        "peak_rss_mb": round(_peak_rss_mb(), 1),
        "file_mb": round(out.stat().st_size / 1e6, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=1000)
    parser.add_argument("--format", choices=[*FORMATS, "all"], default="all")
    parser.add_argument("--child", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(run_one(Path(args.child[0]), Path(args.child[1]))))
        return 0

    formats = FORMATS if args.format == "all" else (args.format,)
    failed = False
    with tempfile.TemporaryDirectory(prefix="rhbatch-sweep-bench-") as tmp:
        workdir = Path(tmp)
        spec = write_spec(workdir, args.prompts, args.seeds)
        print(f"sweep: {args.prompts:,} prompts x {args.seeds:,} seeds")
        print(f"{'format':8} {'rows':>10} {'seconds':>8} {'rows/s':>9} {'peak MB':>8} {'file MB':>8}")
        for fmt in formats:
            out = workdir / f"manifest.{fmt}"
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(spec), str(out)],
                check=True,
                capture_output=True,
                text=True,
            )
            r = json.loads(proc.stdout)
            over = r["peak_rss_mb"] > PEAK_RSS_BUDGET_MB
            failed |= over
            print(
                f"{fmt:8} {r['rows']:>10,} {r['seconds']:>8} {r['rows_per_s']:>9,} "
                f"{r['peak_rss_mb']:>8} {r['file_mb']:>8}" + ("  OVER BUDGET" if over else "")
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
