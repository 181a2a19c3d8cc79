"""``rhbatch sim`` / ``python -m pipeline.sim``: serves until Ctrl-C, reports bad configs."""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from pipeline.sim.cli import sim_command

ROOT = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.skipif(sys.platform == "win32", reason="sends SIGINT")
def test_sim_command_serves_open_accounts_until_ctrl_c():
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.sim", "--port", "0", "--seed", "1", "--time-scale", "1000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.fullmatch(r"RunningHub simulator listening on (http://127\.0\.0\.1:\d+)\n", line)
        assert match, line
        key = secrets.token_hex(16)
        with httpx.Client(base_url=match.group(1), timeout=5.0) as http:
            status = http.post("/uc/openapi/accountStatus", json={"apikey": key}).json()
            assert status["code"] == 0 and status["data"]["apiType"] == "NORMAL"
            created = http.post("/task/openapi/create",
                                json={"apiKey": key, "workflowId": "1904136902449209346"}).json()
            assert created["code"] == 0
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        assert key not in out + err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_sim_command_reports_a_bad_config(tmp_path):
    config = tmp_path / "sim.yaml"
    config.write_text("time_scale: 1\nspeed: 3\n", encoding="utf-8")
    result = CliRunner().invoke(sim_command, ["--config", str(config), "--port", "0"])
    assert result.exit_code == 2  # bad input, as for every rhbatch command
    assert result.stderr.startswith("Error: ")
    assert "unknown key(s) 'speed'" in result.stderr
    assert result.stdout == ""


def test_sim_command_rejects_a_bad_time_scale():
    result = CliRunner().invoke(sim_command, ["--time-scale", "0", "--port", "0"])
    assert result.exit_code == 2
    assert "time_scale must be > 0" in result.stderr


def test_sim_command_reports_a_port_in_use_with_exit_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(sim_command, ["--port", str(port)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"Error: cannot listen on 127.0.0.1:{port}: ")
    assert result.stderr.rstrip().endswith("pass another --port or --host")
    assert "Traceback" not in result.output


def test_python_m_pipeline_sim_exits_2_on_a_bad_config(tmp_path):
    config = tmp_path / "sim.yaml"
    config.write_text("speed: 3\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.sim", "--config", str(config), "--port", "0"],
        capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("Error: ") and "unknown key(s) 'speed'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("text,message", [
    ("seed: [unclosed\n", "not valid yaml: expected ',' or ']', but got '<stream end>' at line 2, column 1"),
    ("a: b: c\n", "not valid yaml: mapping values are not allowed here at line 1, column 5"),
    ("time_scale: fast\n", "simulator: time_scale must be > 0 (simulated seconds per real second), "
                           "got 'fast'"),
    ("seed: {}\n", "simulator: seed must be an integer, got {}"),
    ("coins_per_second: x\n", "simulator: coins_per_second must be a number >= 0, got 'x'"),
    ("webhook_retries: x\n", "simulator: webhook_retries must be an integer >= 0, got 'x'"),
    ("faults: 3\n", "faults must be a mapping, got 3"),
    ("faults: {routes: create}\n", "simulator faults: routes must be a list of route names or null"),
    ("faults: {after_work_modes: 3}\n", "simulator faults: after_work_modes must be a non-empty list"),
    ("faults: {latency_s: -1}\n", "simulator faults: latency_s must be a number >= 0 (real seconds)"),
    ("accounts: [{key: k, concurrency: x}]\n", "concurrency must be an integer >= 1, got 'x'"),
    ("accounts: [{key: k, free_user: 1}]\n", "free_user must be true or false, got 1"),
    ("workflows: [1]\n", "workflows must be a mapping, got [1]"),
    ('workflows: {"1": 3}\n', "simulator workflow 1: expected the path of an API-format JSON file "
                              "or an inline mapping, got 3"),
    ("[1, 2]\n", "the top level must be a mapping"),
])
def test_every_bad_config_is_one_error_line_and_exit_2(tmp_path, text, message):
    config = tmp_path / "sim.yaml"
    config.write_text(text, encoding="utf-8")
    result = CliRunner().invoke(sim_command, ["--config", str(config), "--port", "0"])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr
    assert result.stdout == ""
