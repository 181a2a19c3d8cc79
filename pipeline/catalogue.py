"""The node catalogue: what ComfyUI's node classes accept, so rows are checked before anything is paid.

A catalogue is ComfyUI's ``GET /object_info`` answer: one entry per node class::

    {"KSampler": {
        "input": {"required": {"seed": ["INT", {"default": 0, "min": 0, "max": 18446744073709551615}],
                               "sampler_name": [["euler", "euler_ancestral", ...], {}],
                               "model": ["MODEL"], ...},
                  "optional": {...}, "hidden": {"prompt": "PROMPT"}},
        "output": ["LATENT"], "output_name": ["LATENT"], "output_node": false, ...}}

An input is ``[TYPE]`` or ``[TYPE, {options}]``. TYPE is ``INT``, ``FLOAT``, ``STRING``, ``BOOLEAN``, a
link type (``MODEL``, ``IMAGE``, ``*`` ...; only a link can feed it), or a COMBO in one of two
encodings:

- legacy: the option list itself, ``[["euler", "heun"], {"default": "euler"}]``;
- V3: ``["COMBO", {"options": ["euler", "heun"], ...}]`` (ComfyUI 0.3.64 checks these only when the
  task runs, after it is billed).

An empty option list means "not known here", never "nothing is allowed": the packaged catalogue lists
no models (``ckpt_name``, ``lora_name``, ``vae_name`` ...) and no input files (``LoadImage.image``),
because those are whatever the server that runs the task has installed.

Sources, merged in this order (a later source replaces a class's whole entry):

1. the packaged ``pipeline/_data/catalogue/core_nodes.json``: ComfyUI's core nodes that workflows
   commonly use (samplers, latents, loaders, CLIP, VAE, image ops, ControlNet, upscale models, save
   and preview), written from their documented definitions in ComfyUI 0.3.64, with that release's
   sampler and scheduler names;
2. the user's own ``--object-info FILE``: a saved ``GET /object_info`` of their ComfyUI server
   (:func:`export_object_info` saves one), which adds custom nodes and lists that server's models.

:attr:`Catalogue.sha256` (:func:`catalogue_hash`: sha256 of the canonical JSON of the merged classes,
sorted keys, compact, UTF-8) identifies the catalogue a run was checked against, like
``workflow_hash`` does a workflow.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from pipeline._files import atomic_write
from pipeline.errors import InputError, ResourceMissing

PACKAGED_FILE = "core_nodes.json"
PACKAGED_DIR = ("_data", "catalogue")
PACKAGED_NAME = "rhbatch core nodes"
MAX_OBJECT_INFO_BYTES = 64 * 1024 * 1024  # a stock server's is ~0.5 MB, RunningHub's ~30 MB
EXPORT_TIMEOUT_S = 120.0  # the whole download
EXPORT_CONNECT_TIMEOUT_S = 10.0
EXPORT_READ_TIMEOUT_S = 30.0  # one read
OBJECT_INFO_PATH = "/object_info"

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
CATEGORIES = ("required", "optional", "hidden")
OPTIONS_SHOWN = 8  # COMBO options in a summary


# ---------------------------------------------------------------------------------------------
# One input of one class


@dataclass(frozen=True)
class InputSpec:
    """One declared input of a node class, as the catalogue describes it.

    ``type`` is ``INT``, ``FLOAT``, ``STRING``, ``BOOLEAN``, ``COMBO`` (both encodings) or a link
    type such as ``IMAGE``; ``""`` when the entry is malformed. ``options`` is None unless a COMBO;
    ``()`` means the options are not known here (models, input files): never check membership.
    """

    class_type: str
    name: str
    category: str  # required, optional or hidden
    type: str
    options: tuple[Any, ...] | None = None
    encoding: str | None = None  # "legacy" or "v3" for a COMBO
    config: Mapping[str, Any] = field(default_factory=dict, hash=False)

    @property
    def default(self) -> Any:
        return self.config.get("default")

    @property
    def min(self) -> Any:
        return _number(self.config.get("min"))

    @property
    def max(self) -> Any:
        return _number(self.config.get("max"))

    @property
    def step(self) -> Any:
        return _number(self.config.get("step"))

    @property
    def round(self) -> Any:
        return self.config.get("round")

    @property
    def required(self) -> bool:
        return self.category == "required"

    @property
    def is_combo(self) -> bool:
        return self.type == "COMBO"

    @property
    def is_widget(self) -> bool:
        """A value is typed in (INT, FLOAT, STRING, BOOLEAN, COMBO); otherwise a link feeds it."""
        return self.type in WIDGET_TYPES

    @property
    def options_known(self) -> bool:
        """A COMBO whose options this catalogue lists (an empty list means unknown here)."""
        return bool(self.options)

    def summary(self) -> str:
        """One line for ``rhbatch inspect``: ``INT 16..16384 step 8, default 512``,
        ``one of euler, heun, ... (42 options)``, ``model or file name (not known here)``."""
        if self.is_combo:
            if not self.options:
                return "a name from the server's list (not known here)"
            shown = ", ".join(str(o) for o in self.options[:OPTIONS_SHOWN])
            more = f", ... ({len(self.options)} options)" if len(self.options) > OPTIONS_SHOWN else ""
            default = f", default {self.default}" if self.default is not None else ""
            late = " (checked only when the task runs)" if self.encoding == "v3" else ""
            return f"one of {shown}{more}{default}{late}"
        if not self.is_widget:
            return f"link ({self.type or '?'})"
        parts = [self.type]
        lo, hi = self.min, self.max
        if lo is not None and hi is not None:
            parts.append(f"{lo}..{hi}")
        elif lo is not None:
            parts.append(f">= {lo}")
        elif hi is not None:
            parts.append(f"<= {hi}")
        if self.step is not None:
            parts.append(f"step {self.step}")
        text = " ".join(parts)
        if self.default is not None:
            text += f", default {json.dumps(self.default, ensure_ascii=False)}"
        return text


def _number(value: Any) -> int | float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def parse_input(class_type: str, name: str, category: str, raw: Any) -> InputSpec:
    """An :class:`InputSpec` from one ``/object_info`` input entry (any shape; malformed ones get
    ``type ""``)."""
    if isinstance(raw, str):  # hidden inputs: "prompt": "PROMPT"
        return InputSpec(class_type, name, category, raw)
    if not isinstance(raw, list | tuple) or not raw:
        return InputSpec(class_type, name, category, "")
    head = raw[0]
    config = raw[1] if len(raw) > 1 and isinstance(raw[1], dict) else {}
    if isinstance(head, list | tuple):
        return InputSpec(class_type, name, category, "COMBO", tuple(head), "legacy", config)
    if head == "COMBO":
        options = config.get("options")
        listed = tuple(options) if isinstance(options, list | tuple) else ()
        return InputSpec(class_type, name, category, "COMBO", listed, "v3", config)
    if isinstance(head, str):
        return InputSpec(class_type, name, category, head, None, None, config)
    return InputSpec(class_type, name, category, "", None, None, config)


# ---------------------------------------------------------------------------------------------
# The catalogue


@dataclass(frozen=True)
class Source:
    """Where some of a catalogue's classes came from."""

    name: str  # "rhbatch core nodes" or the file's path
    classes: int
    sha256: str

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "classes": self.classes, "sha256": self.sha256}


class Catalogue:
    """Node classes by name, with typed lookups. Build one with :func:`load_catalogue`."""

    def __init__(self, classes: Mapping[str, Mapping[str, Any]], sources: Iterable[Source] = ()):
        self._classes: dict[str, Mapping[str, Any]] = dict(classes)
        self.sources: tuple[Source, ...] = tuple(sources)
        self._inputs: dict[str, dict[str, InputSpec]] = {}
        self._sha256: str | None = None

    def __contains__(self, class_type: object) -> bool:
        return class_type in self._classes

    def __len__(self) -> int:
        return len(self._classes)

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = catalogue_hash(self._classes)
        return self._sha256

    def knows(self, class_type: str) -> bool:
        return class_type in self._classes

    def class_names(self) -> list[str]:
        return sorted(self._classes)

    def raw(self, class_type: str) -> Mapping[str, Any] | None:
        """The class's ``/object_info`` entry as loaded."""
        return self._classes.get(class_type)

    def object_info(self) -> dict[str, Mapping[str, Any]]:
        """The merged catalogue in ``/object_info`` shape."""
        return dict(self._classes)

    def inputs(self, class_type: str) -> dict[str, InputSpec] | None:
        """Every declared input (required, then optional, then hidden), or None for an unknown class."""
        cached = self._inputs.get(class_type)
        if cached is not None:
            return cached
        entry = self._classes.get(class_type)
        if entry is None:
            return None
        specs: dict[str, InputSpec] = {}
        declared = entry.get("input")
        if isinstance(declared, dict):
            for category in CATEGORIES:
                group = declared.get(category)
                if isinstance(group, dict):
                    for name, raw in group.items():
                        specs.setdefault(str(name), parse_input(class_type, str(name), category, raw))
        self._inputs[class_type] = specs
        return specs

    def input(self, class_type: str, name: str) -> InputSpec | None:
        """One input of a class; None when the class or the input is not known here."""
        specs = self.inputs(class_type)
        return None if specs is None else specs.get(name)

    def required_inputs(self, class_type: str) -> list[str] | None:
        specs = self.inputs(class_type)
        return None if specs is None else [n for n, s in specs.items() if s.category == "required"]

    def output_types(self, class_type: str) -> tuple[Any, ...] | None:
        """The class's output slot types (a COMBO output is its option list), or None if unknown."""
        entry = self._classes.get(class_type)
        if entry is None:
            return None
        output = entry.get("output")
        return tuple(output) if isinstance(output, list | tuple) else ()

    def output_names(self, class_type: str) -> tuple[str, ...] | None:
        entry = self._classes.get(class_type)
        if entry is None:
            return None
        names = entry.get("output_name")
        if isinstance(names, list | tuple):
            return tuple(str(n) for n in names)
        return tuple(str(t) for t in self.output_types(class_type) or ())

    def is_output_node(self, class_type: str) -> bool | None:
        """Whether the class is an output node (SaveImage, PreviewImage ...); None if unknown."""
        entry = self._classes.get(class_type)
        if entry is None:
            return None
        return entry.get("output_node") is True

    def meta(self) -> dict[str, Any]:
        """What a run records about the catalogue it was checked against."""
        return {"sha256": self.sha256, "classes": len(self._classes),
                "sources": [s.as_dict() for s in self.sources]}

    def describe(self) -> str:
        """``rhbatch core nodes (29 classes) + my_info.json (478 classes)``."""
        return " + ".join(f"{s.name} ({s.classes} classes)" for s in self.sources) or "empty catalogue"


def catalogue_hash(object_info: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON (sorted keys, compact, UTF-8) of an ``/object_info`` mapping."""
    canonical = json.dumps(object_info, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                           allow_nan=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------
# Loading


_FILE_FIX = ("save it from a running ComfyUI with `rhbatch catalogue export URL -o FILE` "
             "(its GET /object_info answer)")


def packaged_object_info() -> dict[str, Any]:
    """The packaged catalogue's classes, in ``/object_info`` shape."""
    item = resources.files("pipeline").joinpath(*PACKAGED_DIR, PACKAGED_FILE)
    try:
        data = item.read_bytes()
    except OSError:
        raise ResourceMissing(f"The node catalogue {PACKAGED_FILE} is missing from the installation: "
                              "reinstall rhbatch") from None
    return parse_object_info(data, PACKAGED_FILE)


def parse_object_info(data: bytes | str, source: str) -> dict[str, Any]:
    """The node classes in ``data`` (a ``GET /object_info`` answer). Entries that are not objects
    with an ``input`` mapping are left out; :class:`InputError` names the fix when nothing is
    usable."""
    try:
        obj: Any = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{source}: not JSON ({exc}): {_FILE_FIX}") from None
    if not isinstance(obj, dict):
        raise InputError(f"{source}: expected a JSON object of node classes: {_FILE_FIX}")
    if obj and all(isinstance(v, dict) and "class_type" in v for v in obj.values()):
        raise InputError(f"{source}: this is a workflow (nodes with class_type), not a node "
                         f"catalogue: {_FILE_FIX}")
    classes = {str(k): v for k, v in obj.items()
               if isinstance(v, dict) and isinstance(v.get("input"), dict)}
    if not classes:
        raise InputError(f"{source}: no node class in it (each needs an \"input\" object): "
                         f"{_FILE_FIX}")
    return classes


def load_object_info(path: str | os.PathLike[str], *,
                     max_bytes: int = MAX_OBJECT_INFO_BYTES) -> dict[str, Any]:
    """The node classes of a saved ``/object_info`` file, read up to ``max_bytes``."""
    shown = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size > max_bytes:
                raise InputError(f"{shown}: {size} bytes, more than a node catalogue's "
                                 f"{max_bytes} bytes: {_FILE_FIX}")
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise InputError(f"{shown}: no such file: check the --object-info path") from None
    except IsADirectoryError:
        raise InputError(f"{shown}: a directory, not a file: check the --object-info path") from None
    except OSError as exc:
        raise InputError(f"{shown}: cannot read it ({exc.strerror or exc}): "
                         "check the --object-info path") from None
    if len(data) > max_bytes:
        raise InputError(f"{shown}: more than a node catalogue's {max_bytes} bytes: {_FILE_FIX}")
    return parse_object_info(data, shown)


def load_catalogue(object_info: str | os.PathLike[str] | None = None, *,
                   packaged: bool = True) -> Catalogue:
    """The packaged catalogue with the user's ``--object-info FILE`` (if any) merged over it: a
    class in the file replaces the packaged entry of the same name whole."""
    merged: dict[str, Any] = {}
    sources: list[Source] = []
    if packaged:
        core = packaged_object_info()
        merged.update(core)
        sources.append(Source(PACKAGED_NAME, len(core), catalogue_hash(core)))
    if object_info is not None:
        user = load_object_info(object_info)
        merged.update(user)
        sources.append(Source(os.fspath(object_info), len(user), catalogue_hash(user)))
    return Catalogue(merged, sources)


def catalogue_from(object_info: Mapping[str, Any], name: str = "given") -> Catalogue:
    """A catalogue of exactly these classes (tests, the simulator's config)."""
    classes = {str(k): v for k, v in object_info.items() if isinstance(v, dict)}
    return Catalogue(classes, [Source(name, len(classes), catalogue_hash(classes))])


# ---------------------------------------------------------------------------------------------
# Export from a server


@dataclass(frozen=True)
class ExportResult:
    path: Path
    url: str  # as shown: no credentials, no key-like path segments
    classes: int
    bytes: int
    sha256: str  # catalogue_hash of the classes saved


_KEYLIKE_SEGMENT = re.compile(r"[A-Za-z0-9_\-]{16,}")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")


def shown_url(url: str) -> str:
    """``url`` fit for a message: no user info, query or fragment, and key-like path segments
    (RunningHub's ``/proxy/{apiKey}``) masked."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(an unparsable URL)"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    segments = ["***" if _KEYLIKE_SEGMENT.fullmatch(s) else s for s in parts.path.split("/")]
    return f"{parts.scheme}://{host}{port}{'/'.join(segments)}"


def object_info_url(url: str) -> str:
    """``{url}/object_info`` for a server's base URL (a URL already ending in it is kept)."""
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        raise InputError("the URL given is not a URL: give the ComfyUI server's address, e.g. "
                         "http://127.0.0.1:8188") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"{shown_url(url)} is not an http(s) URL: give the ComfyUI server's "
                         "address, e.g. http://127.0.0.1:8188")
    base = url.strip().split("#", 1)[0]
    path_end = base.split("?", 1)[0].rstrip("/")
    if path_end.endswith(OBJECT_INFO_PATH):
        return path_end
    return path_end + OBJECT_INFO_PATH


def export_object_info(url: str, out_path: str | os.PathLike[str], *,
                       timeout_s: float = EXPORT_TIMEOUT_S,
                       max_bytes: int = MAX_OBJECT_INFO_BYTES,
                       transport: httpx.BaseTransport | None = None) -> ExportResult:
    """Fetch ``GET {url}/object_info`` and save it, atomically, at ``out_path``.

    The answer is read up to ``max_bytes`` (decoded) within ``timeout_s`` in all, must be a node
    catalogue (:func:`parse_object_info`), and is saved byte for byte as the server sent it.
    Raises :class:`InputError` with the fix; the URL is never shown with credentials or a key.
    """
    target = object_info_url(url)
    shown = shown_url(target)
    timeout = httpx.Timeout(EXPORT_READ_TIMEOUT_S, connect=EXPORT_CONNECT_TIMEOUT_S)
    deadline = time.monotonic() + timeout_s
    chunks: list[bytes] = []
    size = 0
    try:
        with httpx.Client(timeout=timeout, follow_redirects=False, transport=transport) as client:
            with client.stream("GET", target, headers={"Accept": "application/json"}) as response:
                if response.status_code != 200:
                    raise InputError(
                        f"{shown} answered HTTP {response.status_code}: check that the URL is a "
                        "ComfyUI server (its page opens in a browser) and that it is running")
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > max_bytes:
                        raise InputError(f"{shown}: the answer is larger than {max_bytes} bytes, "
                                     "more than any node catalogue: check the URL")
                    if time.monotonic() > deadline:
                        raise InputError(f"{shown}: the answer took more than {timeout_s:g} s: "
                                     "try again, or nearer the server")
                    chunks.append(chunk)
    except httpx.HTTPError as exc:
        reason = _URL_IN_TEXT.sub(lambda m: shown_url(m.group()), str(exc)) or type(exc).__name__
        raise InputError(f"cannot fetch {shown} ({reason}): check the URL and that the "
                         "ComfyUI server is running and reachable") from None
    body = b"".join(chunks)
    classes = parse_object_info(body, shown)
    out = Path(out_path)
    try:
        atomic_write(out, body)
    except OSError as exc:
        raise InputError(f"cannot write {out} ({exc.strerror or exc}): choose another -o FILE") from None
    return ExportResult(out, shown, len(classes), len(body), catalogue_hash(classes))
