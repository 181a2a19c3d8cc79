"""The node catalogue: the packaged file, both COMBO encodings, models not known here, unknown
classes, a user's /object_info merged over it, its hash, and export from a ComfyUI server on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from pipeline import catalogue as cat
from pipeline.errors import InputError, ResourceMissing

BRIEF_CLASSES = """KSampler KSamplerAdvanced CheckpointLoaderSimple CLIPTextEncode EmptyLatentImage VAEDecode
VAEEncode SaveImage PreviewImage LoraLoader LoadImage ImageScale LatentUpscale CLIPSetLastLayer
ControlNetLoader ControlNetApply UpscaleModelLoader ImageUpscaleWithModel""".split()

CUSTOM = {
    "MyNode": {
        "input": {"required": {"mode": [["fast", "slow"], {"default": "fast"}],
                               "bare": [["x", "y"]],
                               "style": ["COMBO", {"options": ["a", "b"], "default": "a"}],
                               "later": ["COMBO", {}],
                               "image": ["IMAGE"], "weight": ["FLOAT", {"min": 0.0, "max": 2.0}]},
                  "optional": {"mask": ["MASK", {}]},
                  "hidden": {"unique_id": "UNIQUE_ID"}},
        "output": ["IMAGE", ["fast", "slow"]], "output_name": ["image", "mode"], "output_node": True,
    },
    "KSampler": {"input": {"required": {"sampler_name": [["only_mine"], {}]}}, "output": ["LATENT"],
                 "output_node": False},
}


@pytest.fixture(scope="module")
def core() -> cat.Catalogue:
    return cat.load_catalogue()


def test_the_packaged_catalogue_has_the_core_nodes(core):
    assert set(BRIEF_CLASSES) <= set(core.class_names())
    assert core.sources[0].name == "rhbatch core nodes" and core.sources[0].classes == len(core)
    seed = core.input("KSampler", "seed")
    assert (seed.type, seed.min, seed.max, seed.default) == ("INT", 0, 2**64 - 1, 0)
    assert seed.category == "required"
    cfg = core.input("KSampler", "cfg")
    assert (cfg.type, cfg.min, cfg.max, cfg.default) == ("FLOAT", 0.0, 100.0, 8.0)
    assert (cfg.step, cfg.round) == (0.1, 0.01)
    width = core.input("EmptyLatentImage", "width")
    assert (width.min, width.max, width.step) == (16, 16384, 8)
    assert core.input("CLIPSetLastLayer", "stop_at_clip_layer").min == -24


def test_the_simulator_reads_the_same_packaged_file():
    from pipeline.sim.comfy import core_catalogue

    assert core_catalogue() == cat.packaged_object_info()


def test_a_missing_packaged_file_says_to_reinstall(monkeypatch):
    monkeypatch.setattr(cat, "PACKAGED_FILE", "gone.json")
    with pytest.raises(ResourceMissing) as caught:
        cat.load_catalogue()
    assert str(caught.value) == ("The node catalogue gone.json is missing from the installation: "
                                 "reinstall rhbatch")


def test_sampler_and_scheduler_names(core):
    samplers = core.input("KSampler", "sampler_name")
    assert (samplers.type, samplers.encoding) == ("COMBO", "legacy")
    assert len(samplers.options) == 42 and samplers.options[0] == "euler"
    assert {"euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde_gpu", "ddim", "uni_pc", "uni_pc_bh2", "lcm"} <= set(
        samplers.options)
    assert core.input("KSampler", "scheduler").options == (
        "simple", "sgm_uniform", "karras", "exponential", "ddim_uniform", "beta", "normal",
        "linear_quadratic", "kl_optimal")
    assert core.input("KSamplerAdvanced", "sampler_name").options == samplers.options


def test_both_combo_encodings_are_read():
    c = cat.catalogue_from(CUSTOM)
    mode, bare, style, later = (c.input("MyNode", n) for n in ("mode", "bare", "style", "later"))
    assert (mode.type, mode.encoding, mode.options) == ("COMBO", "legacy", ("fast", "slow"))
    assert mode.default == "fast"
    assert (bare.type, bare.encoding, bare.options, bare.config) == ("COMBO", "legacy", ("x", "y"), {})
    assert (style.type, style.encoding, style.options, style.default) == ("COMBO", "v3", ("a", "b"), "a")
    assert (later.encoding, later.options, later.options_known) == ("v3", (), False)
    assert style.summary() == "one of a, b, default a (checked only when the task runs)"


def test_packaged_v3_combo(core):
    direction = core.input("ImageStitch", "direction")
    assert (direction.encoding, direction.options) == ("v3", ("right", "down", "left", "up"))
    assert core.raw("ImageStitch")["input"]["required"]["direction"][0] == "COMBO"


@pytest.mark.parametrize(("node", "name"), [
    ("CheckpointLoaderSimple", "ckpt_name"), ("LoraLoader", "lora_name"), ("VAELoader", "vae_name"),
    ("ControlNetLoader", "control_net_name"), ("UpscaleModelLoader", "model_name"), ("LoadImage", "image"),
])
def test_model_and_file_lists_are_empty_meaning_not_known_here(core, node, name):
    spec = core.input(node, name)
    assert (spec.type, spec.options, spec.options_known) == ("COMBO", (), False)
    assert spec.summary() == "a name from the server's list (not known here)"


def test_unknown_classes_and_inputs(core):
    assert not core.knows("MyCustomNode") and "MyCustomNode" not in core
    assert core.inputs("MyCustomNode") is None
    assert core.input("MyCustomNode", "x") is None
    assert core.output_types("MyCustomNode") is None
    assert core.is_output_node("MyCustomNode") is None
    assert core.input("KSampler", "nosuch") is None


def test_outputs_links_and_categories(core):
    assert core.output_types("CheckpointLoaderSimple") == ("MODEL", "CLIP", "VAE")
    assert core.output_names("ControlNetApplyAdvanced") == ("positive", "negative")
    assert core.is_output_node("SaveImage") is True and core.is_output_node("PreviewImage") is True
    assert core.is_output_node("KSampler") is False
    model = core.input("KSampler", "model")
    assert (model.type, model.is_widget, model.summary()) == ("MODEL", False, "link (MODEL)")
    assert core.input("ImageStitch", "image2").category == "optional"
    assert core.input("SaveImage", "prompt").category == "hidden"
    assert core.required_inputs("EmptyLatentImage") == ["width", "height", "batch_size"]
    assert core.input("EmptyLatentImage", "width").summary() == "INT 16..16384 step 8, default 512"


def test_a_user_file_is_merged_over_the_packaged_one(tmp_path, core):
    path = tmp_path / "object_info.json"
    path.write_text(json.dumps(CUSTOM), encoding="utf-8")
    merged = cat.load_catalogue(path)
    assert merged.knows("MyNode") and merged.is_output_node("MyNode") is True
    assert merged.output_types("MyNode") == ("IMAGE", ["fast", "slow"])  # a COMBO output: its options
    # a class in the user's file replaces the packaged entry whole
    assert merged.input("KSampler", "sampler_name").options == ("only_mine",)
    assert merged.input("KSampler", "seed") is None
    assert merged.input("EmptyLatentImage", "width") == core.input("EmptyLatentImage", "width")
    assert len(merged) == len(core) + 1
    assert [s.name for s in merged.sources] == ["rhbatch core nodes", str(path)]
    assert merged.sources[1].classes == 2
    meta = merged.meta()
    assert meta["sha256"] == merged.sha256 and meta["classes"] == len(merged)
    assert meta["sources"][1] == {"name": str(path), "classes": 2, "sha256": cat.catalogue_hash(CUSTOM)}
    assert merged.describe() == f"rhbatch core nodes ({len(core)} classes) + {path} (2 classes)"


def test_the_hash_is_stable_and_follows_the_content(tmp_path, core):
    assert core.sha256 == cat.load_catalogue().sha256 == cat.catalogue_hash(cat.packaged_object_info())
    reordered = {k: CUSTOM[k] for k in reversed(list(CUSTOM))}
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(CUSTOM), encoding="utf-8")
    b.write_text(json.dumps(reordered, indent=3, sort_keys=True), encoding="utf-8")
    assert cat.load_catalogue(a).sha256 == cat.load_catalogue(b).sha256
    changed = json.loads(json.dumps(CUSTOM))
    changed["MyNode"]["input"]["required"]["weight"][1]["max"] = 3.0
    b.write_text(json.dumps(changed), encoding="utf-8")
    assert cat.load_catalogue(b).sha256 != cat.load_catalogue(a).sha256
    assert len(core.sha256) == 64 and int(core.sha256, 16) >= 0


def test_malformed_entries_are_left_out_and_malformed_inputs_are_not_known():
    c = cat.catalogue_from({"Good": {"input": {"required": {"x": [], "y": 5, "z": ["INT"]}}},
                            "Bad": "not an object"})
    assert c.class_names() == ["Good"]
    assert c.input("Good", "x").type == "" and c.input("Good", "y").type == ""
    assert c.input("Good", "z").type == "INT" and c.input("Good", "z").min is None


@pytest.mark.parametrize(("content", "says"), [
    (b"{not json", "not JSON"),
    (b"[1, 2]", "expected a JSON object of node classes"),
    (json.dumps({"3": {"class_type": "KSampler", "inputs": {}}}).encode(), "this is a workflow"),
    (json.dumps({"A": {"output": []}}).encode(), 'no node class in it (each needs an "input" object)'),
])
def test_a_user_file_that_is_not_a_catalogue(tmp_path, content, says):
    path = tmp_path / "info.json"
    path.write_bytes(content)
    with pytest.raises(InputError) as caught:
        cat.load_catalogue(path)
    assert str(caught.value).startswith(f"{path}: {says}")
    assert "rhbatch catalogue export URL -o FILE" in str(caught.value)
    assert caught.value.exit_code == 2


def test_a_missing_or_oversized_user_file(tmp_path):
    with pytest.raises(InputError) as caught:
        cat.load_catalogue(tmp_path / "nope.json")
    assert str(caught.value) == f"{tmp_path / 'nope.json'}: no such file: check the --object-info path"
    big = tmp_path / "big.json"
    big.write_text(json.dumps(CUSTOM), encoding="utf-8")
    with pytest.raises(InputError) as caught:
        cat.load_object_info(big, max_bytes=100)
    assert "more than a node catalogue's 100 bytes" in str(caught.value)


# -- export from a server ----------------------------------------------------------------------


class InfoServer:
    """A tiny ComfyUI stand-in on loopback: ``/object_info`` and a few bad variants."""

    def __init__(self, body: bytes):
        self.body = body
        self.paths: list[str] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.paths.append(request.path)
        kind = request.match_info.get("kind", "")
        if kind == "broken":
            return web.Response(status=500, text="boom")
        if kind == "workflow":
            return web.json_response({"3": {"class_type": "KSampler", "inputs": {}}})
        if kind in ("big", "slow"):
            response = web.StreamResponse()
            await response.prepare(request)
            for _ in range(200 if kind == "big" else 50):
                await response.write(b" " * (64 * 1024 if kind == "big" else 10))
                if kind == "slow":
                    await asyncio.sleep(0.05)
            return response
        if kind or "key" in request.match_info:
            return web.Response(status=404, text="no")
        return web.Response(body=self.body, content_type="application/json")

    async def _start(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/object_info", self._handle)
        app.router.add_get("/{kind}/object_info", self._handle)
        app.router.add_get("/proxy/{key}/object_info", self._handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(runner.addresses[0][1])
        return runner

    def _run(self) -> None:
        runner = self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())
        self._loop.close()

    def __enter__(self) -> InfoServer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def server() -> Iterator[InfoServer]:
    body = json.dumps(CUSTOM, indent=2).encode("utf-8")
    with InfoServer(body) as srv:
        yield srv


def _leftovers(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


@pytest.mark.parametrize("suffix", ["", "/", "/object_info"])
def test_export_saves_the_servers_answer_as_sent(server, tmp_path, suffix):
    out = tmp_path / "sub" / "info.json"
    result = cat.export_object_info(server.url + suffix, out)
    assert server.paths == ["/object_info"]
    assert out.read_bytes() == server.body
    assert (result.path, result.classes, result.bytes) == (out, 2, len(server.body))
    assert result.sha256 == cat.catalogue_hash(CUSTOM) == cat.load_catalogue(out, packaged=False).sha256
    assert result.url == f"{server.url}/object_info"
    assert _leftovers(out.parent) == ["info.json"]


def test_export_stops_at_the_size_cap_and_writes_nothing(server, tmp_path):
    out = tmp_path / "info.json"
    with pytest.raises(InputError) as caught:
        cat.export_object_info(f"{server.url}/big", out, max_bytes=1024 * 1024)
    assert str(caught.value) == (f"{server.url}/big/object_info: the answer is larger than 1048576 bytes, "
                                 "more than any node catalogue: check the URL")
    assert _leftovers(tmp_path) == []


def test_export_is_bounded_in_time(server, tmp_path):
    with pytest.raises(InputError) as caught:
        cat.export_object_info(f"{server.url}/slow", tmp_path / "info.json", timeout_s=0.3)
    assert "the answer took more than 0.3 s" in str(caught.value)
    assert _leftovers(tmp_path) == []


def test_export_refuses_what_is_not_a_catalogue(server, tmp_path):
    out = tmp_path / "info.json"
    with pytest.raises(InputError) as caught:
        cat.export_object_info(f"{server.url}/broken", out)
    assert str(caught.value) == (f"{server.url}/broken/object_info answered HTTP 500: check that the URL is "
                                 "a ComfyUI server (its page opens in a browser) and that it is running")
    with pytest.raises(InputError) as caught:
        cat.export_object_info(f"{server.url}/workflow", out)
    assert "this is a workflow" in str(caught.value)
    assert _leftovers(tmp_path) == []


def test_export_never_shows_a_key_in_the_url(server, tmp_path):
    key = secrets.token_hex(16)
    with pytest.raises(InputError) as caught:
        cat.export_object_info(f"http://user:pw@127.0.0.1:{server.port}/proxy/{key}", tmp_path / "i.json")
    text = str(caught.value)
    assert key not in text and "pw" not in text
    assert text.startswith(f"http://127.0.0.1:{server.port}/proxy/***/object_info answered HTTP 404")


def test_export_from_a_server_that_is_not_there(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    key = secrets.token_hex(16)
    with pytest.raises(InputError) as caught:
        cat.export_object_info(f"http://127.0.0.1:{port}/proxy/{key}", tmp_path / "i.json")
    text = str(caught.value)
    assert text.startswith(f"cannot fetch http://127.0.0.1:{port}/proxy/***/object_info (")
    assert text.endswith("): check the URL and that the ComfyUI server is running and reachable")
    assert key not in text
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


@pytest.mark.parametrize("url", ["ftp://host/x", "127.0.0.1:8188", "http://"])
def test_export_wants_an_http_url(tmp_path, url):
    with pytest.raises(InputError) as caught:
        cat.export_object_info(url, tmp_path / "i.json")
    assert "is not an http(s) URL: give the ComfyUI server's address, e.g. http://127.0.0.1:8188" in str(
        caught.value)
