"""Run runninghub-cli 0.1.0's ``rh app batch`` against the simulator (downloaded at run time).

    RUNNINGHUB_API_KEY=... python bench/rhcli_wrapper.py --base-url URL --tasks 200 --concurrency 20

runninghub-cli is not vendored: ``pip download --no-deps runninghub-cli==0.1.0`` fetches its wheel
into ``--workdir`` and it is imported from there. What is patched, and nothing else:

- the URL constants of ``rh/client.py`` (``RUN_APP_URL``, ``OUTPUTS_URL``, ``APP_INFO_URL`` and the
  rest), which hard-code ``https://www.runninghub.cn``, now point at the simulator;
- ``POLL_INTERVAL`` (5 s) and ``MAX_POLL_SECONDS`` (1,200 s) are divided by ``--time-scale``;
- ``get_app_info`` (``GET /api/webapp/apiCallDemo``, which the simulator does not implement) still
  sends its request, so it is counted, but an error answer yields an empty node schema instead of
  failing the row: the real service answers it, and ``run_app`` only uses it for file inputs.

The batch runs the simulator's AI app 1877265245566922753 (text2img) with one CSV row per task.
Exit code 75 means runninghub-cli could not be downloaded (the benchmark skips its row).
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import os
import subprocess
import sys
import zipfile
from contextlib import redirect_stdout
from pathlib import Path

WEBAPP = "1877265245566922753"
VERSION = "0.1.0"
URL_CONSTANTS = ("STANDARD_BASE", "STANDARD_QUERY", "STANDARD_UPLOAD", "ACCOUNT_URL",
                 "APP_UPLOAD_URL", "RUN_APP_URL", "OUTPUTS_URL", "APP_LIST_URL", "APP_INFO_URL")
ORIGIN = "https://www.runninghub.cn"
DOWNLOAD_TIMEOUT_S = 120


def fetch(workdir: Path) -> Path:
    """The unpacked wheel (downloaded once per workdir)."""
    target = workdir / f"runninghub-cli-{VERSION}"
    if target.is_dir():
        return target
    wheels = glob.glob(str(workdir / f"runninghub_cli-{VERSION}-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(workdir),
             f"runninghub-cli=={VERSION}"],
            check=True, timeout=DOWNLOAD_TIMEOUT_S, stdout=subprocess.DEVNULL,
        )
        wheels = glob.glob(str(workdir / f"runninghub_cli-{VERSION}-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extractall(target)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--workdir", type=Path, default=Path("."))
    args = parser.parse_args()
    try:
        path = fetch(args.workdir)
    except Exception as exc:  # offline, index unreachable: the benchmark notes and skips
        print(f"runninghub-cli {VERSION} unavailable: {exc}", file=sys.stderr)
        return 75
    sys.path.insert(0, str(path))
    from click.testing import CliRunner  # noqa: F401  (click is a dependency of both)
    from rh import client
    from rh.commands.app import app

    base = args.base_url.rstrip("/")
    for name in URL_CONSTANTS:
        setattr(client, name, getattr(client, name).replace(ORIGIN, base))
    client.POLL_INTERVAL = client.POLL_INTERVAL / args.time_scale
    client.MAX_POLL_SECONDS = client.MAX_POLL_SECONDS / args.time_scale
    original_info = client.get_app_info

    def get_app_info(webapp_id: str, api_key: str | None = None) -> dict:
        try:
            return original_info(webapp_id, api_key=api_key)
        except client.RunningHubError:
            return {"webappId": webapp_id, "name": "", "description": "", "nodes": []}

    client.get_app_info = get_app_info
    rows = args.workdir / f"rhcli-{os.getpid()}.csv"
    with rows.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["6:text", "3:seed"])
        for i in range(args.tasks):
            writer.writerow([f"a photo of subject {i // 100}", i])
    out = io.StringIO()
    with redirect_stdout(out):
        try:
            app.main(["batch", WEBAPP, "--input", str(rows), "--concurrency",
                      str(args.concurrency), "--api-key", os.environ["RUNNINGHUB_API_KEY"]],
                     standalone_mode=False)
        except SystemExit as exc:
            return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
