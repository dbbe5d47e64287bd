#!/usr/bin/env python
"""Reliability benchmark: bad inputs, a burst with large photos, stalled connections and memory, over loopback.

``scripts/serve.py`` is started as a separate process with its default limits, an API key, and header and body
timeouts of ``--stall-timeout-s`` (default 5 s, so that stalled connections take seconds, not a minute). Models:
image-classifier, text-cnn and fusion from ``--checkpoints``; where that folder lacks them, small ones are
trained on the embedded sample marketplace first (a few minutes on 2 cores; the next run reuses them). Then:

1. warm-up: 100 requests of the burst's mix, 4 at a time; the server's RSS ``--settle-s`` after it is the
   baseline;
2. bad-input corpus: every bad input of issue 19 and of the tests, each sent once, checked for its status and
   error code (a wrong status is a miss; any 5xx, or the server dying, misses a bar);
3. burst: ``--requests`` (2,000) mixed requests, ``--concurrency`` at a time: texts, small photos, batches,
   12-megapixel JPEGs, batches of 12-megapixel transparent PNGs, and the issue's eight 36-megapixel PNGs
   (refused: 413); the server's RSS ``--settle-s`` after it;
4. stalled connections: ``--stalled`` connections at once, half stopping mid-headers (sending a byte a second),
   half mid-body, while 4 clients keep sending valid requests; when each was closed, and the valid requests'
   latency.

Bars (issue 19): 0 x 5xx and no crash over the corpus; every stalled connection closed within the configured
timeout (plus 1 s) while the valid requests keep p99 under 1 s; RSS after the burst within 25% of RSS after
the warm-up. Prints a table, writes ``reports/bench_reliability.md``, exits 1 unless the bars hold.

    python scripts/bench_reliability.py                      # trains into checkpoints/bench-reliability/ once
    python scripts/bench_reliability.py --checkpoints checkpoints --requests 2000 --stalled 300
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import secrets
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from bench_serving import wait_until_ready  # this folder: the scripts share it
from PIL import Image

from marketplace_reco.data.dataset import load_marketplace
from marketplace_reco.data.sample import make_sample_marketplace
from marketplace_reco.serving import ServingSettings
from marketplace_reco.settings import checkpoints_dir, reports_dir
from marketplace_reco.training.benchmarks import BenchmarkReport, markdown_table

SCRIPTS = Path(__file__).resolve().parent
MODELS = ("image-classifier", "text-cnn", "fusion")
RSS_RATIO_BAR = 1.25
VALID_P99_BAR_S = 1.0
CLOSE_SLACK_S = 1.0
_WARMUP_REQUESTS = 100
_STALLED_TRAFFIC_CLIENTS = 4
_TRAINING = (  # small CPU-sized runs, as scripts/docker_smoke.sh trains them
    ["train_word2vec.py", "--plot-method", "pca", "--epochs", "2"],
    ["train_text_cnn.py", "--epochs", "2"],
    ["train_image.py", "--no-pretrained", "--backbone", "resnet10t", "--image-size", "64", "--epochs", "1"],
    ["train_combined.py", "--epochs", "2"],
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", type=Path, default=checkpoints_dir() / "bench-reliability",
                        help="folder with image-classifier, text-cnn and fusion; trained there on the sample "
                             "where missing (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=2000, help="requests in the burst (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=32, help="clients in the burst (default: %(default)s)")
    parser.add_argument("--stalled", type=int, default=300, help="stalled connections (default: %(default)s)")
    parser.add_argument("--stall-timeout-s", type=float, default=5.0,
                        help="the server's header and body timeouts (default: %(default)s)")
    parser.add_argument("--settle-s", type=float, default=2.0,
                        help="wait after the warm-up and the burst before reading RSS (default: %(default)s)")
    parser.add_argument("--torch-threads", type=int, default=ServingSettings().resolved_torch_threads())
    parser.add_argument("--report", type=Path, default=None, help="default: <reports>/bench_reliability.md")
    return parser


# ---- models and server --------------------------------------------------------------------------
def _ensure_models(checkpoints: Path, workdir: Path) -> None:
    if all((checkpoints / name / "config.json").exists() for name in MODELS):
        return
    print(f"training small models on the embedded sample into {checkpoints} ...", flush=True)
    data = ["--db-url", f"sqlite:///{workdir / 'marketplace.db'}", "--images", str(workdir / "images")]
    make_sample_marketplace(data[1], data[3], progress=False)
    env = {**os.environ, "MARKETPLACE_CHECKPOINTS": str(checkpoints.absolute())}
    for step in _TRAINING:
        started = time.perf_counter()
        result = subprocess.run([sys.executable, str(SCRIPTS / step[0]), *step[1:], *data], env=env,
                                capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise SystemExit(f"scripts/{step[0]} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
        print(f"  scripts/{step[0]}: {time.perf_counter() - started:.0f} s", flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    port: int
    key: str
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_mb(self) -> float:
        return _proc_status_kb(self.process.pid, "VmRSS") / 1024

    def peak_rss_mb(self) -> float:
        return _proc_status_kb(self.process.pid, "VmHWM") / 1024


def _proc_status_kb(pid: int, field_name: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{field_name}:\s+(\d+) kB", status, re.MULTILINE).group(1))  # type: ignore[union-attr]


def _start_server(args: argparse.Namespace, workdir: Path) -> Server:
    key = secrets.token_urlsafe(32)
    keys_file = workdir / "api_keys"
    keys_file.write_text(key + "\n")
    port = _free_port()
    timeout = str(args.stall_timeout_s)
    command = [sys.executable, str(SCRIPTS / "serve.py"), "--host", "127.0.0.1", "--port", str(port),
               "--checkpoints", str(args.checkpoints), "--image-model", MODELS[0], "--text-model", MODELS[1],
               "--combined-model", MODELS[2], "--torch-threads", str(args.torch_threads), "--log-level", "warning",
               "--header-timeout-s", timeout, "--body-timeout-s", timeout]
    log = workdir / "server.log"
    env = {**os.environ, "MARKETPLACE_API_KEYS_FILE": str(keys_file)}
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    server = Server(process, port, key, log)
    wait_until_ready(process, server.url, log)
    return server


# ---- inputs -------------------------------------------------------------------------------------
def _encoded(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that claims ``width`` x ``height`` pixels and holds almost none."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


@dataclass
class Inputs:
    """What the requests send: sample listings, and large photos made from one of them."""

    photos: list[bytes]
    texts: list[str]
    large_jpeg: bytes = b""  # 12 megapixels
    large_png: bytes = b""  # 12 megapixels, transparent
    huge_pngs: list[bytes] = field(default_factory=list)  # issue 19: eight 36-megapixel PNGs (1.2 MB in all)

    @classmethod
    def from_sample(cls, workdir: Path) -> Inputs:
        database = workdir / "marketplace.db"
        if not database.exists():
            make_sample_marketplace(f"sqlite:///{database}", workdir / "images", n_products=26, progress=False)
        marketplace = load_marketplace(f"sqlite:///{database}", str(workdir / "images"))
        products = marketplace.products[marketplace.products["image_ids"].map(len) > 0].head(16)
        ids = [image_ids[0] for image_ids in products["image_ids"]]
        photos = marketplace.image_store.get_many(ids)
        inputs = cls([photos[image_id] for image_id in ids], list(products["text"]))
        photo = Image.open(io.BytesIO(inputs.photos[0])).convert("RGB")
        inputs.large_jpeg = _encoded(photo.resize((4000, 3000)), "JPEG", quality=85)
        transparent = photo.resize((4000, 3000)).convert("RGBA")
        transparent.putalpha(Image.linear_gradient("L").resize((4000, 3000)))
        inputs.large_png = _encoded(transparent, "PNG", compress_level=1)
        flat = _encoded(Image.new("RGBA", (6000, 6000), (200, 180, 160, 255)), "PNG", compress_level=9)
        inputs.huge_pngs = [flat] * 8
        return inputs


def _files(photos: list[bytes], name: str = "photo.jpg", kind: str = "image/jpeg") -> list[tuple[str, Any]]:
    return [("image", (name, photo, kind)) for photo in photos]


#: The burst's mix, one slot per request in turn: (what, expected status, request arguments from the inputs).
_MIX: list[tuple[str, int, Callable[[Inputs, int], tuple[str, dict[str, Any]]]]] = [
    *[("text", 200, lambda x, i: ("/text", {"json": {"text": x.texts[i % len(x.texts)]}}))] * 8,
    *[("photo", 200, lambda x, i: ("/image", {"files": _files([x.photos[i % len(x.photos)]])}))] * 4,
    *[("photo + text", 200, lambda x, i: ("/combined", {"files": _files([x.photos[i % len(x.photos)]]),
                                                         "data": {"text": x.texts[i % len(x.texts)]}}))] * 2,
    *[("4 photos", 200, lambda x, i: ("/image/batch", {"files": _files(x.photos[:4])}))] * 2,
    *[("12-MP JPEG", 200, lambda x, i: ("/image", {"files": _files([x.large_jpeg])}))] * 2,
    ("2 x 12-MP RGBA PNG", 200, lambda x, i: ("/image/batch", {"files": _files([x.large_png] * 2, "a.png",
                                                                                  "image/png")})),
    ("8 x 36-MP PNG", 413, lambda x, i: ("/image/batch", {"files": _files(x.huge_pngs, "b.png", "image/png")})),
]


# ---- bad-input corpus ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    status: int
    code: str | None  # None: a success, or not the app's JSON (uvicorn's own answer to a broken request line)
    path: str = "/image"
    request: dict[str, Any] = field(default_factory=dict)
    raw: bytes = b""  # sent as is on a new connection instead of ``request``
    keyed: bool = True


def _corpus(x: Inputs) -> list[Case]:
    red = x.photos[0]
    photo = {"image": ("photo.jpg", red, "image/jpeg")}
    form = "application/x-www-form-urlencoded"
    big_json_text = json.dumps({"text": "sofa " * 3_800_000}).encode()  # 19 MB, as in issue 19
    limits = ServingSettings()

    async def chunks(total: int) -> AsyncIterator[bytes]:
        yield (b'--b\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n'
               b"Content-Type: image/jpeg\r\n\r\n")
        for _ in range(total // (1 << 20)):
            yield b"\xff" * (1 << 20)
        yield b"\r\n--b--\r\n"

    return [
        # issue 19
        Case("eight 36-MP PNGs in one 1.2 MB request (issue 19)", 413, "too_many_pixels", "/image/batch",
             {"files": _files(x.huge_pngs, "b.png", "image/png")}),
        Case("19 MB JSON text", 413, "text_too_long", "/text",
             {"content": big_json_text, "headers": {"Content-Type": "application/json"}}),
        Case("text over the budget as a form field", 413, "text_too_long", "/text",
             {"data": {"text": "x" * (limits.max_request_text_chars + 1)}}),
        Case("65 photos", 413, "too_many_inputs", "/image/batch", {"files": _files([red] * 65)}),
        Case("65 texts (JSON)", 413, "too_many_inputs", "/text/batch", {"json": {"texts": ["sofa"] * 65}}),
        Case("65 texts (form)", 413, "too_many_inputs", "/text/batch", {"data": {"text": ["sofa"] * 65}}),
        Case("10,000 form fields", 413, "too_many_inputs", "/text/batch",
             {"content": b"&".join([b"f=1"] * 10_000), "headers": {"Content-Type": form}}),
        Case("a million JSON texts", 413, "too_many_inputs", "/text/batch",
             {"json": {"texts": ["a"] * 1_000_000}}),
        Case("?model= (empty)", 422, "invalid_request", "/image?model=", {"files": photo}),
        Case("non-UTF-8 multipart text", 422, "invalid_input", "/text",
             {"files": {"text": (None, "caf\xe9".encode("latin-1"))}}),
        Case("non-UTF-8 percent-encoded text", 422, "invalid_input", "/text",
             {"content": b"text=caf%E9", "headers": {"Content-Type": form}}),
        Case("non-UTF-8 raw form body", 422, "invalid_input", "/text",
             {"content": b"text=caf\xe9", "headers": {"Content-Type": form}}),
        Case("non-UTF-8 JSON", 422, "invalid_request", "/text",
             {"content": b'{"text": "caf\xe9"}', "headers": {"Content-Type": "application/json"}}),
        Case("no API key", 401, "unauthorized", "/image", {"files": photo}, keyed=False),
        Case("a wrong API key", 401, "unauthorized", "/image",
             {"files": photo, "headers": {"X-API-Key": "not-the-key-0123456789"}}, keyed=False),
        Case("a 200 KB header", 431, "header_too_large",
             raw=b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"x" * 200_000 + b"\r\n\r\n"),
        Case("a broken request line", 400, None, raw=b"GARBAGE\x00 / HTTP/9.9\r\n\r\n"),
        Case("deeply nested JSON", 422, "invalid_request", "/text",
             {"content": b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
              "headers": {"Content-Type": "application/json"}}),
        # the tests' earlier bad inputs
        Case("not an image", 400, "bad_image", request={"files": {"image": ("x.jpg", b"not an image", "image/jpeg")}}),
        Case("truncated JPEG", 400, "bad_image", request={"files": {"image": ("cut.jpg", red[: len(red) // 2])}}),
        Case("empty file", 400, "bad_image", request={"files": {"image": ("empty.jpg", b"", "image/jpeg")}}),
        Case("PNG header of 25 MP, no pixels", 400, "bad_image",
             request={"files": {"image": ("h.png", _png_header_only(5000, 5000), "image/png")}}),
        Case("decompression bomb (900 MP)", 413, "image_too_large",
             request={"files": {"image": ("bomb.png", _png_header_only(30_000, 30_000), "image/png")}}),
        Case("50-MP photo header", 413, "image_too_large",
             request={"files": {"image": ("big.png", _png_header_only(10_000, 5_000), "image/png")}}),
        Case("text file as photo", 415, "unsupported_media_type",
             request={"files": {"image": ("notes.txt", b"hello", "text/plain")}}),
        Case("JSON to /image", 415, "unsupported_media_type", request={"json": {"image": "aGVsbG8="}}),
        Case("no Content-Type", 415, "unsupported_media_type", request={"content": red}),
        Case("wrong field name", 422, "invalid_input", request={"files": {"photo": red}}),
        Case("photo as a text value", 422, "invalid_input", request={"data": {"image": "not a file"}}),
        Case("two texts to /combined", 422, "invalid_input", "/combined",
             {"files": _files([red]), "data": {"text": ["a red dress", "a sofa"]}}),
        Case("malformed multipart", 400, "bad_request",
             request={"content": b"--x\r\nnonsense", "headers": {"Content-Type": "multipart/form-data"}}),
        Case("empty text", 422, "invalid_input", "/text", {"json": {"text": ""}}),
        Case("blank text", 422, "invalid_input", "/text", {"json": {"text": "   "}}),
        Case("empty form text", 422, "invalid_input", "/text", {"data": {"text": ""}}),
        Case("JSON without text", 422, "invalid_request", "/text", {"json": {}}),
        Case("text as a number", 422, "invalid_request", "/text", {"json": {"text": 42}}),
        Case("unterminated JSON", 422, "invalid_request", "/text",
             {"content": b'{"text": "unterminated', "headers": {"Content-Type": "application/json"}}),
        Case("form without text", 422, "invalid_input", "/text", {"data": {"other": "a phone"}}),
        Case("text as a file", 422, "invalid_input", "/text", {"files": {"text": ("t.txt", b"a phone", "text/plain")}}),
        Case("text/plain body", 415, "unsupported_media_type", "/text",
             {"content": b"a phone", "headers": {"Content-Type": "text/plain"}}),
        Case("image model on /text", 422, "invalid_input", "/text?model=image-classifier", {"json": {"text": "a"}}),
        # A listing with one of the two is answered by the other branch (with a warning): not an error.
        Case("/combined without text (answered from the photo)", 200, None, "/combined", {"files": photo}),
        Case("/combined without photo (answered from the text)", 200, None, "/combined", {"data": {"text": "a phone"}}),
        Case("/combined with neither photo nor text", 422, "invalid_input", "/combined", {"data": {"other": "x"}}),
        Case("unequal photos and texts", 422, "invalid_input", "/combined/batch",
             {"files": _files([red, red]), "data": {"text": "a phone"}}),
        Case("empty text list", 422, "invalid_request", "/text/batch", {"json": {"texts": []}}),
        Case("body over 20 MiB (declared)", 413, "body_too_large",
             request={"files": {"image": ("big.jpg", b"\xff" * (limits.max_body_bytes + 1), "image/jpeg")}}),
        Case("chunked body over 20 MiB", 413, "body_too_large",
             request={"content": chunks(limits.max_body_bytes + (2 << 20)),
                      "headers": {"Content-Type": "multipart/form-data; boundary=b"}}),
        Case("unknown model", 404, "unknown_model", "/image?model=nope", {"files": photo}),
        Case("unknown route", 404, "not_found", "/nowhere", {"files": photo}),
    ]


async def _raw_exchange(port: int, data: bytes) -> tuple[int, str | None]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    chunks = []
    try:
        writer.write(data)
        async with asyncio.timeout(30):
            while chunk := await reader.read(65536):
                chunks.append(chunk)
    except ConnectionResetError:  # closed with bytes of ours unread, after its answer
        pass
    finally:
        writer.close()
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = int(head.split()[1])
    try:
        return status, json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return status, None


async def _run_corpus(server: Server, cases: list[Case]) -> list[tuple[Case, int, str | None]]:
    results = []
    async with httpx.AsyncClient(base_url=server.url, timeout=120) as http:
        for case in cases:
            if case.raw:
                status, code = await _raw_exchange(server.port, case.raw)
            else:
                request = dict(case.request)
                if case.keyed:
                    request["headers"] = {**request.get("headers", {}), "X-API-Key": server.key}
                try:
                    response = await http.post(case.path, **request)
                except httpx.TransportError:  # no answer: a miss, reported as status 0
                    status, code = 0, None
                else:
                    status = response.status_code
                    code = response.json().get("error", {}).get("code")
            results.append((case, status, code))
    return results


# ---- burst and traffic --------------------------------------------------------------------------
@dataclass
class Burst:
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    unexpected: Counter[tuple[str, int]] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    seconds: float = 0.0


async def _burst(server: Server, inputs: Inputs, n_requests: int, concurrency: int) -> Burst:
    burst = Burst()
    next_request = 0
    headers = {"X-API-Key": server.key}

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal next_request
        while next_request < n_requests:
            index = next_request
            next_request += 1
            what, expected, build = _MIX[index % len(_MIX)]
            path, request = build(inputs, index)
            started = time.perf_counter()
            try:
                status = (await http.post(path, headers=headers, **request)).status_code
            except httpx.TransportError:
                status = 0  # no answer at all
            burst.latencies_s.append(time.perf_counter() - started)
            burst.statuses[(what, status)] += 1
            if status != expected:
                burst.unexpected[(what, status)] += 1

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=server.url, timeout=300, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        burst.seconds = time.perf_counter() - started
    return burst


@dataclass
class Stalls:
    closed_after_s: dict[str, list[float]] = field(default_factory=lambda: {"mid-headers": [], "mid-body": []})
    not_closed: int = 0
    valid_latencies_s: list[float] = field(default_factory=list)
    valid_errors: int = 0


async def _stall(port: int, kind: str, timeout_s: float, stalls: Stalls) -> None:
    """One connection that stops mid-headers (a byte a second) or mid-body; when the server closed it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        started = time.monotonic()
        if kind == "mid-headers":
            head = b"POST /text HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-Slow: "
            writer.write(head[:20])
            read = asyncio.ensure_future(reader.read())
            for byte in head[20:]:  # a slowloris: a byte now and then, the head never complete
                done, _ = await asyncio.wait([read], timeout=1.0)
                if done:
                    break
                writer.write(bytes([byte]))
        else:
            writer.write(b"POST /text HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 10000\r\n\r\n" + b'{"text": "' + b"sofa " * 20)
            read = asyncio.ensure_future(reader.read())
        try:
            await asyncio.wait_for(read, timeout_s + 30)
            stalls.closed_after_s[kind].append(time.monotonic() - started)
        except TimeoutError:
            stalls.not_closed += 1
        except ConnectionResetError:
            stalls.closed_after_s[kind].append(time.monotonic() - started)
    finally:
        writer.close()


async def _stalled_phase(server: Server, inputs: Inputs, n_stalled: int, timeout_s: float) -> Stalls:
    stalls = Stalls()
    stalled_done = asyncio.Event()
    headers = {"X-API-Key": server.key}

    async def valid_traffic(http: httpx.AsyncClient, client: int) -> None:
        index = client
        while not stalled_done.is_set():
            path, request = (_MIX[0] if index % 2 else _MIX[8])[2](inputs, index)  # texts and photos in turn
            started = time.perf_counter()
            try:
                ok = (await http.post(path, headers=headers, **request)).status_code == 200
            except httpx.TransportError:
                ok = False
            stalls.valid_latencies_s.append(time.perf_counter() - started)
            stalls.valid_errors += not ok
            index += _STALLED_TRAFFIC_CLIENTS

    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        traffic = [asyncio.ensure_future(valid_traffic(http, client)) for client in range(_STALLED_TRAFFIC_CLIENTS)]
        kinds = ["mid-headers", "mid-body"] * (n_stalled // 2)
        await asyncio.gather(*(_stall(server.port, kind, timeout_s, stalls) for kind in kinds))
        stalled_done.set()
        await asyncio.gather(*traffic)
    return stalls


# ---- report -------------------------------------------------------------------------------------
def _ms(seconds: list[float], q: float) -> str:
    return f"{np.percentile(seconds, q) * 1000:.0f} ms" if seconds else "-"


def _answer(status: int, code: str | None) -> str:
    return f"{status} {code or ('(not JSON)' if status >= 400 else '')}".strip()


def _report(args: argparse.Namespace, corpus: list[tuple[Case, int, str | None]], alive_after_corpus: bool,
            burst: Burst, stalls: Stalls, rss: dict[str, float], setup: str) -> tuple[str, list[str]]:
    errors_5xx = [case.name for case, status, _ in corpus if status >= 500]
    misses = [(case, status, code) for case, status, code in corpus if (status, code) != (case.status, case.code)]
    closed = [t for times in stalls.closed_after_s.values() for t in times]
    slowest_close = max(closed, default=float("inf"))
    valid_p99 = float(np.percentile(stalls.valid_latencies_s, 99)) if stalls.valid_latencies_s else float("inf")
    ratio = rss["after burst"] / rss["after warm-up"]
    limit_s = args.stall_timeout_s + CLOSE_SLACK_S
    corpus_measured = f"{len(errors_5xx)} x 5xx, server {'alive' if alive_after_corpus else 'DEAD'}"
    stalled_bar = (f"{args.stalled} stalled connections closed within the timeout ({args.stall_timeout_s:g} s + "
                   f"{CLOSE_SLACK_S:g} s)")
    stalled_measured = (f"{len(closed)} closed, slowest after {slowest_close:.2f} s, "
                        f"{stalls.not_closed} never")
    valid_measured = (f"{len(stalls.valid_latencies_s)} requests, p50 {_ms(stalls.valid_latencies_s, 50)}, "
                      f"p99 {_ms(stalls.valid_latencies_s, 99)}, {stalls.valid_errors} errors")
    rss_measured = f"{rss['after warm-up']:.0f} MB -> {rss['after burst']:.0f} MB ({ratio:.2f} x)"
    bars = [
        ("0 x 5xx, no crash over the bad-input corpus", corpus_measured, not errors_5xx and alive_after_corpus),
        (stalled_bar, stalled_measured, stalls.not_closed == 0 and slowest_close <= limit_s),
        ("valid requests meanwhile: p99 < 1 s, no error", valid_measured,
         valid_p99 < VALID_P99_BAR_S and not stalls.valid_errors),
        (f"RSS after the burst within {RSS_RATIO_BAR - 1:.0%} of RSS after warm-up", rss_measured,
         ratio <= RSS_RATIO_BAR),
    ]
    failures = [bar for bar, _, held in bars if not held]
    summary = markdown_table(["bar", "measured", "held"],
                             [[bar, measured, "yes" if held else "**no**"] for bar, measured, held in bars])

    corpus_table = markdown_table(["bad input", "expected", "got"], [
        [case.name, _answer(case.status, case.code),
         _answer(status, code) + ("" if (status, code) == (case.status, case.code) else " **(miss)**")]
        for case, status, code in corpus])
    burst_table = markdown_table(["request", "answers"], [
        [what, ", ".join(f"{n} x {status}" for (kind, status), n in sorted(burst.statuses.items()) if kind == what)]
        for what in dict.fromkeys(what for what, _, _ in _MIX)])
    stall_table = markdown_table(["stalled", "connections", "closed after (p50 / max)"], [
        [kind, len(times), f"{np.median(times):.2f} s / {max(times):.2f} s" if times else "-"]
        for kind, times in stalls.closed_after_s.items()])
    rss_table = markdown_table(["when", "RSS"], [[when, f"{mb:.0f} MB"] for when, mb in rss.items()])
    unexpected = sum(burst.unexpected.values())
    details = (
        f"## Bad-input corpus\n\n{len(corpus)} cases, {len(misses)} answered otherwise than expected.\n\n"
        + corpus_table
        + f"\n\n## Burst\n\n{sum(burst.statuses.values())} requests from {args.concurrency} clients in "
        f"{burst.seconds:.0f} s ({sum(burst.statuses.values()) / burst.seconds:.1f} req/s), p50 "
        f"{_ms(burst.latencies_s, 50)}, p99 {_ms(burst.latencies_s, 99)}; {unexpected} answers other than "
        f"expected.\n\n" + burst_table
        + f"\n\n## Stalled connections\n\nHeader and body timeouts {args.stall_timeout_s:g} s; times from "
        "connecting (mid-headers) or from the end of the headers (mid-body).\n\n" + stall_table
        + "\n\n## Memory (server RSS)\n\n" + rss_table
    )
    verdict = "all bars hold" if not failures else "bars missed: " + "; ".join(failures)
    return f"{setup}.\n\n{summary}\n\nResult: {verdict}.\n\n{details}\n", failures


def main() -> None:
    args = _parser().parse_args()
    if args.stalled < 2 or args.requests < len(_MIX):
        raise SystemExit(f"--stalled must be at least 2 and --requests at least {len(_MIX)}")
    report = BenchmarkReport("Reliability benchmark", args.report or reports_dir() / "bench_reliability.md")
    with tempfile.TemporaryDirectory(prefix="bench-reliability-") as work:
        workdir = Path(work)
        _ensure_models(args.checkpoints, workdir)
        inputs = Inputs.from_sample(workdir)
        cases = _corpus(inputs)
        server = _start_server(args, workdir)
        try:
            rss = {"ready": server.rss_mb()}
            print("warm-up ...", flush=True)
            asyncio.run(_burst(server, inputs, _WARMUP_REQUESTS, 4))
            time.sleep(args.settle_s)
            rss["after warm-up"] = server.rss_mb()
            print(f"bad-input corpus: {len(cases)} cases ...", flush=True)
            corpus = asyncio.run(_run_corpus(server, cases))
            alive = server.process.poll() is None and httpx.get(f"{server.url}/health").status_code == 200
            print(f"burst: {args.requests} requests from {args.concurrency} clients ...", flush=True)
            burst = asyncio.run(_burst(server, inputs, args.requests, args.concurrency))
            time.sleep(args.settle_s)
            rss["after burst"] = server.rss_mb()
            print(f"stalled connections: {args.stalled} ...", flush=True)
            stalls = asyncio.run(_stalled_phase(server, inputs, args.stalled, args.stall_timeout_s))
            rss["at the end"] = server.rss_mb()
            rss["peak"] = server.peak_rss_mb()
        finally:
            server.process.terminate()
            server.process.wait(timeout=60)
    setup = (f"Server with default limits, {args.torch_threads} torch threads, an API key, header and body timeouts "
             f"{args.stall_timeout_s:g} s; models {', '.join(MODELS)} from {args.checkpoints}")
    body, failures = _report(args, corpus, alive, burst, stalls, rss, setup)
    print(f"\n{body}")
    report.write(body)
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
