"""``rhbatch validate`` of a large CSV beside the pandas floor: wall time and peak RSS of each.

Writes a CSV of ``--rows`` rows (1,000,000 by default, about 99 MB) with a workflowId column and
four bound columns (``6.text``, ``3.seed``, ``3.cfg``, ``3.sampler_name``: a prompt x seed sweep,
one distinct prompt per 100 rows), then runs, each in its own child process:

- ``python -m pipeline validate FILE`` (no key, so no preflight against the workflow);
- ``pandas.read_csv(FILE)``: what reading the same file into columns costs at least.

Each child's wall time, CPU time and peak RSS come from ``os.wait4`` (on Linux ``ru_maxrss`` is
KiB). The exit code is 0 when validate exits 0 and stays under both targets.

    python bench/validate_memory.py                      # 1,000,000 rows
    python bench/validate_memory.py --rows 200000 --keep /tmp/m.csv
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW_ID = "1904136902449209346"
SAMPLERS = ("euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "uni_pc")
TARGET_WALL_S = 6.0  # per 1,000,000 rows
TARGET_PEAK_MB = 800.0  # per 1,000,000 rows (at least a tenth of it)
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_child  # noqa: E402  (bench/common.py: one wait4 measurement for every script)

CHILD_TIMEOUT_S = 600.0
PANDAS_READ = "import sys, pandas; frame = pandas.read_csv(sys.argv[1]); print(len(frame))"


def write_csv(path: Path, rows: int) -> None:
    """``rows`` distinct rows, written by hand (much faster than csv.writer at this size)."""
    with path.open("w", encoding="utf-8", newline="") as fh:
        fh.write("workflowId,6.text,3.seed,3.cfg,3.sampler_name\n")
        lines = []
        for i in range(rows):
            lines.append(f'{WORKFLOW_ID},"a photo of subject {i // 100}, studio light, soft focus, 35mm",'
                         f"{i},{5.0 + (i % 7) * 0.5},{SAMPLERS[i % len(SAMPLERS)]}\n")
            if len(lines) >= 65536:
                fh.write("".join(lines))
                lines.clear()
        fh.write("".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--keep", type=Path, help="write the CSV here and keep it (reused if present)")
    parser.add_argument("--no-pandas", action="store_true", help="skip the pandas floor")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.keep or Path(tmp) / "validate.csv"
        if not path.exists():
            write_csv(path, args.rows)
        size_mb = path.stat().st_size / 1e6
        ours = run_child([sys.executable, "-m", "pipeline", "validate", str(path)],
                         timeout_s=CHILD_TIMEOUT_S)
        floor = None if args.no_pandas else run_child(
            [sys.executable, "-c", PANDAS_READ, str(path)], timeout_s=CHILD_TIMEOUT_S)
    scale = args.rows / 1e6
    wall_target, peak_target = TARGET_WALL_S * scale, TARGET_PEAK_MB * max(scale, 0.1)
    ok = ours["exit"] == 0 and ours["wall_s"] < wall_target and ours["peak_rss_mb"] < peak_target
    print(f"validate_memory: {args.rows:,}-row CSV, {size_mb:.0f} MB, 4 bound columns")
    print(f"  rhbatch validate : {ours['wall_s']:6.2f} s wall ({ours['cpu_s']:.2f} s CPU), "
          f"peak RSS {ours['peak_rss_mb']:5.0f} MB, exit {ours['exit']}   "
          f"[target < {wall_target:g} s, < {peak_target:.0f} MB: {'OK' if ok else 'MISSED'}]")
    if floor is not None:
        print(f"  pandas.read_csv  : {floor['wall_s']:6.2f} s wall ({floor['cpu_s']:.2f} s CPU), "
              f"peak RSS {floor['peak_rss_mb']:5.0f} MB, exit {floor['exit']}")
    if ours["exit"] != 0:
        print(ours["stderr"], file=sys.stderr)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
