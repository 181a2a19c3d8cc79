"""Input files uploaded once per content, and AI-app runs, end to end against the simulator."""

from __future__ import annotations

import json
from collections import Counter

from conftest import fast_settings, read_results

from pipeline import store as st
from pipeline.batch import ManifestArgs, run_batch
from pipeline.sim import DEFAULT_WEBAPP_ID, IMG2IMG_WORKFLOW_ID


def _png(seed: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (seed, 255 - seed, 7)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_inputs_are_uploaded_once_per_content_and_sent_as_file_names(
    make_sim, api_key, tmp_path
):
    sim = make_sim()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(_png(1))
    (tmp_path / "in" / "a_copy.png").write_bytes(_png(1))  # same bytes, other name
    (tmp_path / "in" / "b.png").write_bytes(_png(2))
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        "workflowId,10.image,6.text,3.seed\n"
        f"{IMG2IMG_WORKFLOW_ID},in/a.png,watercolor,1\n"
        f"{IMG2IMG_WORKFLOW_ID},in/a_copy.png,watercolor,2\n"
        f"{IMG2IMG_WORKFLOW_ID},@in/b.png,charcoal,3\n"
        f"{IMG2IMG_WORKFLOW_ID},in/b.png,ink,4\n",
        encoding="utf-8",
    )
    summary = run_batch(ManifestArgs(manifest), tmp_path / "run", fast_settings(sim, api_key),
                        handle_signals=False)
    assert summary.counts[st.SUCCESS] == 4
    uploads = [r for r in sim.audit.requests() if r["route"] in ("upload", "v2_upload")]
    assert len(uploads) == 2  # two distinct contents
    sent = [next(i["fieldValue"] for i in t["nodeInfoList"] if i["nodeId"] == "10")
            for t in sorted(sim.audit.tasks(), key=lambda t: t["created_at"])]
    assert all(v.startswith("api/") and v.endswith(".png") for v in sent)
    assert sent[0] == sent[1] and sent[2] == sent[3] and sent[0] != sent[2]
    recorded = [next(i["fieldValue"] for i in r["nodeInfoList"] if i["nodeId"] == "10")
                for r in read_results(tmp_path / "run")]
    assert recorded == sent  # the output manifest holds exactly what was sent
    cache = json.loads((tmp_path / "run" / "uploads.json").read_text())
    assert len(cache["uploads"]) == 2


def test_missing_input_file_is_a_validation_error_before_any_request(make_sim, api_key, tmp_path):
    from pipeline.errors import ManifestError

    sim = make_sim()
    manifest = tmp_path / "m.csv"
    manifest.write_text(
        f"workflowId,10.image,6.text\n{IMG2IMG_WORKFLOW_ID},nowhere.png,x\n", encoding="utf-8"
    )
    try:
        run_batch(ManifestArgs(manifest), tmp_path / "run", fast_settings(sim, api_key),
                  handle_signals=False)
    except ManifestError as exc:
        assert 'row 1, column "10.image"' in str(exc) and "nowhere.png" in str(exc)
    else:
        raise AssertionError("a missing input file must stop the run before it starts")
    routes = Counter(r["route"] for r in sim.audit.requests())
    assert routes["create"] == 0 and routes["upload"] == 0 and routes["v2_upload"] == 0


def test_ai_app_rows_go_to_ai_app_run(make_sim, api_key, tmp_path):
    from pipeline.config import resolve_settings

    sim = make_sim()
    manifest = tmp_path / "m.csv"
    manifest.write_text("6.text,3.seed\na fox,1\na crow,2\n", encoding="utf-8")
    base = fast_settings(sim, api_key)
    settings = resolve_settings(
        api_key=api_key, base_url=sim.base_url, env={}, concurrency=base.concurrency,
        poll_interval_s=base.poll_interval_s, account_poll_interval_s=base.account_poll_interval_s,
        max_poll_interval_s=base.max_poll_interval_s, task_options={"webappId": DEFAULT_WEBAPP_ID},
    )
    summary = run_batch(
        ManifestArgs(manifest, workflow_id=DEFAULT_WEBAPP_ID, preflight=False), tmp_path / "run",
        settings, handle_signals=False,
    )
    assert summary.counts[st.SUCCESS] == 2
    routes = Counter(r["route"] for r in sim.audit.requests())
    assert routes["ai_app_run"] == 2 and routes["create"] == 0
    assert {t["webapp_id"] for t in sim.audit.tasks()} == {DEFAULT_WEBAPP_ID}
