"""Issue #13: numbers and texts people read. Coins are written 1,000,000,000, never 1e+09, and
failure summaries are cut after a whole word."""

from __future__ import annotations

from click.testing import CliRunner
from conftest import FAST_FLAGS, TEXT2IMG, write_manifest

from pipeline import store as st
from pipeline.cli import cli
from pipeline.manifest import make_row


def invoke(args: list[str], env: dict[str, str | None] | None = None):
    base: dict[str, str | None] = {"RUNNINGHUB_API_KEY": None, "RUNNINGHUB_BASE_URL": None}
    base.update(env or {})
    return CliRunner().invoke(cli, [str(a) for a in args], env=base)


def test_run_prints_the_balance_with_thousands_separators(make_sim, api_key, tmp_path):
    sim = make_sim(coins=10**9)
    manifest = write_manifest(tmp_path / "m.csv", 2)
    result = invoke(["run", manifest, "--out", tmp_path / "run", "-q", *FAST_FLAGS],
                    {"RUNNINGHUB_API_KEY": api_key, "RUNNINGHUB_BASE_URL": sim.base_url})
    assert result.exit_code == 0, result.output
    assert "Account: SHARED, 1,000,000,000 coins, 0 task(s) running or queued\n" in result.stderr
    assert "e+" not in result.stderr


def test_sweep_prints_expected_coins_with_thousands_separators(tmp_path):
    earlier = st.RunStore.open(tmp_path / "earlier", create=True)
    earlier.insert_rows([make_row(0, 1, "r0", TEXT2IMG,
                                  [{"nodeId": "3", "fieldName": "seed", "fieldValue": 0}])])
    earlier.mark_submitting(0)
    earlier.mark_submitted(0, "100", st.RUNNING, 1.0)
    earlier.mark_success(0, [{"fileUrl": "http://x", "consumeCoins": 2e9}], 2.0)
    earlier.close()
    spec = tmp_path / "spec.yaml"
    spec.write_text(f'workflowId: "{TEXT2IMG}"\nbindings: {{seed: "3.seed"}}\n'
                    "axes: {seed: {range: [0, 30]}}\n", encoding="utf-8")
    result = invoke(["sweep", spec, "-o", tmp_path / "m.csv", "--cost-from", tmp_path / "earlier"])
    assert result.exit_code == 0, result.output
    assert result.stderr == (
        f"{spec}: 30 rows\n"
        f"  expected about 60,000,000,000 coins (2,000,000,000 per task, measured in "
        f"{tmp_path / 'earlier'})\n")


def test_top_failures_cut_after_a_whole_word(tmp_path):
    from pipeline.status import top_failures

    store = st.RunStore.open(tmp_path / "run", create=True)
    store.insert_rows([make_row(0, 1, "r0", TEXT2IMG,
                                [{"nodeId": "3", "fieldName": "seed", "fieldValue": 0}])])
    store.mark_submitting(0)
    store.mark_submitted(0, "100", st.RUNNING, 1.0)
    error = "RunningHub task failed (805): " + "CUDA out of memory while sampling " * 8
    store.mark_failed(0, code=805, error=error, at=2.0)
    store.close()
    [(count, cause)] = top_failures(tmp_path / "run")
    assert count == 1
    assert cause == ("805: RunningHub task failed (805): CUDA out of memory while sampling CUDA out "
                     "of memory while sampling CUDA out of memory while sampling CUDA out of "
                     "memory while…")


def test_a_flag_value_is_echoed_as_it_is_typed_and_amounts_for_people_have_thousands():
    from pipeline.safetext import amount, number

    assert number(1e9) == "1000000000" and number(12.5) == "12.5" and number(0.014) == "0.014"
    assert amount(1e9) == "1,000,000,000" and amount(12.5) == "12.5" and amount(None) == "unknown"
