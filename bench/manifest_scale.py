"""How fast a large CSV manifest validates, and how much memory it takes.

Generates ``row_id,workflowId,6.text,3.seed,3.cfg`` with PROMPTS distinct prompts x SEEDS seeds in a
temporary directory, times :func:`pipeline.manifest.load_manifest` in a fresh process state and
prints rows/s and peak RSS (``resource.getrusage``; on Linux ``ru_maxrss`` is KiB).

    python bench/manifest_scale.py                 # 1,000,000 rows
    python bench/manifest_scale.py --prompts 100 --seeds 100 --distinct-prompts
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.manifest import load_manifest  # noqa: E402

WORKFLOW_ID = "1904136902449209346"
TARGET_SECONDS = 20.0
TARGET_PEAK_MB = 1536.0


def write_csv(path: Path, prompts: int, seeds: int, row_ids: bool, distinct: bool) -> int:
    rows = 0
    with path.open("w", encoding="utf-8", newline="") as fh:
        fh.write(("row_id," if row_ids else "") + "workflowId,6.text,3.seed,3.cfg\n")
        for p in range(prompts):
            for s in range(seeds):
                prompt = (f"a watercolour of subject {p * seeds + s if distinct else p}, soft light, "
                          "highly detailed")
                cfg = 5.0 + (s % 5) * 0.5
                prefix = f"p{p}s{s}," if row_ids else ""
                fh.write(f'{prefix}{WORKFLOW_ID},"{prompt}",{s},{cfg}\n')
                rows += 1
    return rows


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=1000)
    parser.add_argument("--no-row-id", action="store_true", help="derive row ids from content")
    parser.add_argument("--distinct-prompts", action="store_true", help="every row its own prompt")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scale.csv"
        rows = write_csv(path, args.prompts, args.seeds, not args.no_row_id, args.distinct_prompts)
        size_mb = path.stat().st_size / 1e6
        before = peak_mb()
        start = time.perf_counter()
        manifest = load_manifest(path)
        elapsed = time.perf_counter() - start
        peak = peak_mb()
    assert len(manifest.rows) == rows
    ok = elapsed < TARGET_SECONDS and peak < TARGET_PEAK_MB
    print(f"manifest_scale: {rows:,} rows ({size_mb:.0f} MB CSV) validated in {elapsed:.2f} s = "
          f"{rows / elapsed:,.0f} rows/s; peak RSS {peak:.0f} MB (before load {before:.0f} MB) "
          f"[{'OK' if ok else 'OVER'} target {TARGET_SECONDS:.0f} s / {TARGET_PEAK_MB:.0f} MB]")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
