"""Throughput of the RunningHub simulator: requests/second and latency under a mixed load.

The simulator runs in its own process (``python -m pipeline.sim``) so the load generator does not
steal its interpreter; the generator drives several keep-alive async clients, each with a few
concurrent workers, for a bounded time and request count, on loopback only. The mix is creates
(with distinct seeds), outputs polls of created tasks, and accountStatus calls.

Two client libraries are measured in turn. httpx is what rhbatch uses, but on this class of machine
one httpx process tops out near 500-600 requests/s of its own CPU, so it measures httpx more than
the simulator; aiohttp's client costs several times less per request and shows what the server
sustains. The report includes the server process's CPU time per request, which is the honest
server-side number whichever client is used.

    python bench/sim_throughput.py                    # 5 s per client library, 4 clients x 16 workers
    python bench/sim_throughput.py --client httpx --seconds 10 --clients 8 --workers 8
    python bench/sim_throughput.py --in-process       # simulator in this process (for comparison)
    python bench/sim_throughput.py --profile out.prof # cProfile the in-process simulator's thread
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import random
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TEXT2IMG = "1904136902449209346"
MIX = (("create", 0.2), ("outputs", 0.6), ("account_status", 0.2))
MAX_REQUESTS = 500_000
START_TIMEOUT_S = 15.0
SIM_CONFIG = {
    "seed": 1,
    "time_scale": 1000.0,
    "open_accounts": True,  # no key is written to disk: any well-formed key is an account
    "default_account": {"api_type": "SHARED", "concurrency": 10_000_000, "coins": 1e15},
}


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Load:
    def __init__(self, base_url: str, key: str, seconds: float, clients: int, workers: int, seed: int,
                 library: str = "httpx"):
        self.base_url = base_url
        self.key = key
        self.seconds = seconds
        self.clients = clients
        self.workers = workers
        self.library = library
        self.rng = random.Random(seed)
        self.task_ids: list[str] = []
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.codes: dict[str, dict[Any, int]] = defaultdict(lambda: defaultdict(int))
        self.errors: dict[str, int] = defaultdict(int)
        self.sent = 0
        self.seed_counter = 0

    def _pick(self) -> str:
        u = self.rng.random()
        for route, share in MIX:
            if u < share:
                return route
            u -= share
        return MIX[-1][0]

    async def _post(self, client: Any, path: str, body: dict[str, Any]) -> Any:
        if self.library == "httpx":
            response = await client.post(path, json=body)
            return response.json()
        async with client.post(self.base_url + path, json=body) as response:
            return json.loads(await response.read())

    async def _one(self, client: Any, route: str) -> None:
        if route == "outputs" and not self.task_ids:
            route = "create"
        if route == "create":
            self.seed_counter += 1
            path, body = "/task/openapi/create", {
                "apiKey": self.key, "workflowId": TEXT2IMG,
                "nodeInfoList": [{"nodeId": "3", "fieldName": "seed", "fieldValue": self.seed_counter}],
            }
        elif route == "outputs":
            path, body = "/task/openapi/outputs", {"apiKey": self.key,
                                                    "taskId": self.rng.choice(self.task_ids)}
        else:
            path, body = "/uc/openapi/accountStatus", {"apikey": self.key}
        began = time.perf_counter()
        try:
            answer = await self._post(client, path, body)
        except Exception as exc:  # noqa: BLE001 - count every transport failure by type
            self.errors[type(exc).__name__] += 1
            return
        self.latencies[route].append(time.perf_counter() - began)
        self.codes[route][answer.get("code")] += 1
        if route == "create" and answer.get("code") == 0:
            self.task_ids.append(answer["data"]["taskId"])

    async def _worker(self, client: Any, deadline: float) -> None:
        while time.perf_counter() < deadline and self.sent < MAX_REQUESTS:
            self.sent += 1
            await self._one(client, self._pick())

    def _clients(self) -> list[Any]:
        if self.library == "httpx":
            limits = httpx.Limits(max_connections=self.workers, max_keepalive_connections=self.workers)
            return [httpx.AsyncClient(base_url=self.base_url, timeout=10.0, limits=limits)
                    for _ in range(self.clients)]
        import aiohttp

        return [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=self.workers),
                                      timeout=aiohttp.ClientTimeout(total=10.0))
                for _ in range(self.clients)]

    async def run(self, server_cpu: Any = None) -> tuple[float, float | None]:
        """Run the load; return (elapsed real seconds, server CPU seconds or None)."""
        clients = self._clients()
        try:
            # warm up: open the connections
            await asyncio.gather(*(self._one(c, "account_status")
                                   for c in clients for _ in range(self.workers)))
            self.latencies.clear()
            self.codes.clear()
            self.sent = 0
            cpu0 = server_cpu() if server_cpu else None
            began = time.perf_counter()
            deadline = began + self.seconds
            await asyncio.gather(*(self._worker(c, deadline) for c in clients for _ in range(self.workers)))
            elapsed = time.perf_counter() - began
            cpu = server_cpu() - cpu0 if server_cpu and cpu0 is not None else None
            return elapsed, cpu
        finally:
            for client in clients:
                if self.library == "httpx":
                    await client.aclose()
                else:
                    await client.close()

    def report(self, elapsed: float, where: str, server_cpu_s: float | None = None) -> str:
        lines = [
            f"Simulator throughput ({where}; {self.clients} {self.library} clients x {self.workers} "
            f"workers, {elapsed:.1f} s, {os.cpu_count()} CPUs)",
            f"{'route':<16}{'requests':>10}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}  codes",
            "-" * 78,
        ]
        total = 0
        everything: list[float] = []
        for route, _ in MIX:
            values = self.latencies.get(route, [])
            total += len(values)
            everything.extend(values)
            codes = ", ".join(f"{c}:{n}" for c, n in sorted(self.codes[route].items(), key=str))
            lines.append(f"{route:<16}{len(values):>10}{len(values) / elapsed:>10.0f}"
                         f"{_percentile(values, 0.5) * 1000:>10.2f}{_percentile(values, 0.99) * 1000:>10.2f}"
                         f"  {codes}")
        lines.append("-" * 78)
        p50, p99 = _percentile(everything, 0.5) * 1000, _percentile(everything, 0.99) * 1000
        lines.append(f"{'total':<16}{total:>10}{total / elapsed:>10.0f}{p50:>10.2f}{p99:>10.2f}"
                     f"  errors: {dict(self.errors) or 0}")
        if server_cpu_s is not None and total:
            per_request_ms = server_cpu_s / total * 1000
            lines.append(f"server CPU {server_cpu_s:.2f} s = {per_request_ms:.3f} ms/request "
                         f"(~{1000 / per_request_ms:.0f} req/s per saturated core); "
                         f"server busy {server_cpu_s / elapsed:.0%} of the run")
        return "\n".join(lines)


def _process_cpu_s(pid: int) -> Any:
    """A function returning the user+system CPU seconds of ``pid`` (Linux /proc), or None."""
    stat = Path(f"/proc/{pid}/stat")
    if not stat.exists():
        return None
    ticks = os.sysconf("SC_CLK_TCK")

    def read() -> float:
        fields = stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / ticks

    return read


def _start_subprocess(config_path: Path) -> tuple[subprocess.Popen[str], str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.sim", "--port", "0", "--config", str(config_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
    )
    assert proc.stdout is not None
    began = time.monotonic()
    line = proc.stdout.readline()
    match = re.search(r"listening on (http://\S+)", line)
    if not match or time.monotonic() - began > START_TIMEOUT_S:
        proc.kill()
        raise SystemExit(f"simulator did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}")
    return proc, match.group(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0, help="per client library (max 120)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--workers", type=int, default=16, help="concurrent requests per client")
    parser.add_argument("--client", choices=("both", "httpx", "aiohttp"), default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--in-process", action="store_true", help="run the simulator in this process")
    parser.add_argument("--profile", metavar="FILE", help="cProfile the in-process simulator into FILE")
    args = parser.parse_args(argv)
    args.seconds = min(max(args.seconds, 0.5), 120.0)
    libraries = ("httpx", "aiohttp") if args.client == "both" else (args.client,)
    key = secrets.token_hex(16)

    if args.in_process or args.profile:
        from pipeline.sim import AccountConfig, SimConfig, Simulator
        from pipeline.sim import server as sim_server

        profiler = cProfile.Profile() if args.profile else None
        if profiler is not None:  # profile the simulator's own thread
            run = sim_server.Simulator._run

            def profiled(self: Any, *a: Any) -> None:
                profiler.enable()
                try:
                    run(self, *a)
                finally:
                    profiler.disable()

            sim_server.Simulator._run = profiled  # type: ignore[method-assign]
        config = SimConfig(seed=1, time_scale=1000.0, accounts=[AccountConfig(
            key=key, api_type="SHARED", concurrency=10_000_000, coins=1e15)])
        with Simulator(config) as sim:
            for library in libraries:
                load = Load(sim.base_url, key, args.seconds, args.clients, args.workers, args.seed, library)
                elapsed, _ = asyncio.run(load.run())
                print(load.report(elapsed, "simulator in-process"), end="\n\n")
        if profiler is not None:
            profiler.dump_stats(args.profile)
            print(f"profile written to {args.profile}")
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "sim.json"
        config_path.write_text(json.dumps(SIM_CONFIG), encoding="utf-8")
        proc, base_url = _start_subprocess(config_path)
        try:
            for library in libraries:
                load = Load(base_url, key, args.seconds, args.clients, args.workers, args.seed, library)
                elapsed, cpu = asyncio.run(load.run(_process_cpu_s(proc.pid)))
                print(load.report(elapsed, "simulator in a subprocess", cpu), end="\n\n")
        finally:
            proc.terminate()
            try:
                proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
