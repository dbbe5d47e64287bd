#!/usr/bin/env python
"""Serving benchmark: throughput and latency over HTTP against the in-process batched throughput of the same models.

``scripts/serve.py`` is started as a separate process on a loopback port; then, for ``/image``, ``/text`` and
``/combined`` in turn, ``--rounds`` times over (so both measurements meet the same load from other processes):
1. in process: the endpoint's model predicts the sample listings (encoded photos and texts, decoding
   included) in batches of ``--max-batch-size``, as fast as it can, while the server idles;
2. over HTTP: many concurrent clients send the server one listing per request.
Prints a table, writes ``reports/bench_serving.md`` and exits with 1 unless the bars hold: served throughput
at least 0.8 of in-process for /image and /combined, no errors, /text p50 under 20 ms (30 ms for a text
transformer, a network some hundred times larger than the text CNN).

    python scripts/bench_serving.py                       # checkpoints image-classifier, text-cnn, fusion
    python scripts/bench_serving.py --requests 2000 --concurrency 64
    python scripts/bench_serving.py --text-model text-transformer    # /text latency of the transformer
    python scripts/bench_serving.py --text-model text-transformer --quantization int8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httptools
import httpx
import numpy as np
import torch

from marketplace_reco.data.dataset import load_marketplace
from marketplace_reco.models import QUANTIZATIONS
from marketplace_reco.serving import Predictor, ServingSettings
from marketplace_reco.settings import reports_dir
from marketplace_reco.training.benchmarks import BenchmarkReport, markdown_table

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVE_SCRIPT = REPO_ROOT / "scripts" / "serve.py"
MIN_REQUESTS = 1000
SERVED_RATIO_BAR = 0.8
TEXT_P50_BAR_MS = 20.0
#: The /text p50 bar of model types that are not held to the default one.
TEXT_P50_BAR_MS_BY_TYPE = {"text-transformer": 30.0}
_READY_TIMEOUT_S = 600
_IN_PROCESS_MIN_S = 2.0
_IN_PROCESS_MIN_BATCHES = 3


@dataclass(frozen=True)
class Listing:
    photo: bytes
    text: str


@dataclass
class Run:
    """One endpoint's measurements, added up over the rounds."""

    endpoint: str
    concurrency: int
    #: The model type behind the endpoint (it sets the /text latency bar).
    model_type: str = ""
    in_process_rates: list[float] = field(default_factory=list)
    served_seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0

    @property
    def requests(self) -> int:
        return len(self.latencies_ms)

    @property
    def throughput(self) -> float:
        return self.requests / self.served_seconds

    @property
    def in_process_per_s(self) -> float:
        return float(np.mean(self.in_process_rates))

    @property
    def p50_bar_ms(self) -> float:
        return TEXT_P50_BAR_MS_BY_TYPE.get(self.model_type, TEXT_P50_BAR_MS)

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q))

    @property
    def ratio(self) -> float:
        return self.throughput / self.in_process_per_s


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-model", default="image-classifier", help="model behind /image (default: %(default)s)")
    parser.add_argument("--text-model", default="text-cnn", help="model behind /text (default: %(default)s)")
    parser.add_argument("--combined-model", default="fusion", help="model behind /combined (default: %(default)s)")
    parser.add_argument("--checkpoints", type=Path, default=None, help="checkpoints folder (MARKETPLACE_CHECKPOINTS)")
    parser.add_argument("--db-url", default=None, help="listings to send (default: the embedded sample database)")
    parser.add_argument("--images", default=None, help="their photos: folder or s3://bucket/prefix")
    parser.add_argument("--listings", type=int, default=64,
                        help="distinct listings cycled through (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=MIN_REQUESTS,
                        help="requests per endpoint (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=4,
                        help="in-process and served measurements alternate this many times (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="concurrent clients for /image and /combined (default: %(default)s)")
    parser.add_argument("--text-concurrency", type=int, default=8,
                        help="concurrent clients for /text (default: %(default)s)")
    defaults = ServingSettings()
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size)
    parser.add_argument("--max-batch-wait-ms", type=float, default=defaults.max_batch_wait_ms)
    parser.add_argument("--torch-threads", type=int, default=defaults.resolved_torch_threads(),
                        help="torch threads of the server (default: %(default)s)")
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default=None,
                        help="serve (and run in process) every model quantized (MARKETPLACE_QUANTIZATION); "
                             "default: float weights")
    parser.add_argument("--report", type=Path, default=None, help="default: <reports>/bench_serving.md")
    return parser


def _listings(args: argparse.Namespace) -> list[Listing]:
    """The first ``--listings`` listings that have a photo (every endpoint is sent the same ones)."""
    marketplace = load_marketplace(args.db_url, args.images)
    with_photos = marketplace.products[marketplace.products["image_ids"].map(len) > 0]
    if with_photos.empty:
        raise SystemExit(f"no listing with a photo in {marketplace.source['database']}")
    products = with_photos.head(args.listings)
    image_ids = [ids[0] for ids in products["image_ids"]]
    photos = marketplace.image_store.get_many(image_ids)
    return [Listing(photos[image_id], text) for image_id, text in zip(image_ids, products["text"], strict=True)]


def _in_process_per_s(predictor: Predictor, listings: list[Listing], batch_size: int) -> float:
    """Inputs per second of ``predict_batch`` (decoding included) in batches of ``batch_size``, over a few seconds."""
    def batch(start: int) -> list[Listing]:
        return [listings[(start + i) % len(listings)] for i in range(batch_size)]

    predictor.predict_batch(**_batch_kwargs(predictor, batch(0)))  # warm-up
    done = 0
    started = time.perf_counter()
    while done < _IN_PROCESS_MIN_BATCHES * batch_size or time.perf_counter() - started < _IN_PROCESS_MIN_S:
        predictor.predict_batch(**_batch_kwargs(predictor, batch(done)))
        done += batch_size
    return done / (time.perf_counter() - started)


def _best_in_process_per_s(predictor: Predictor, listings: list[Listing], args: argparse.Namespace) -> float:
    """In-process inputs/s: the better of the server's torch thread count and all cores."""
    rates = {}
    for threads in sorted({args.torch_threads, len(os.sched_getaffinity(0))}):
        torch.set_num_threads(threads)
        rates[threads] = _in_process_per_s(predictor, listings, args.max_batch_size)
    print(f"  in process {predictor.name}: " + ", ".join(f"{rate:.1f}/s with {threads} torch threads"
                                                     for threads, rate in rates.items()), flush=True)
    return max(rates.values())


def _batch_kwargs(predictor: Predictor, batch: list[Listing]) -> dict[str, list]:
    return {"images": [listing.photo for listing in batch] if predictor.takes_images else None,
            "texts": [listing.text for listing in batch] if predictor.takes_texts else None}


def _encoded_requests(endpoint: str, listings: list[Listing], port: int) -> list[bytes]:
    """Each listing's whole HTTP/1.1 request to ``/<endpoint>`` (multipart or JSON, encoded by httpx), once."""
    encoded = []
    for listing in listings:
        url = f"http://127.0.0.1:{port}/{endpoint}"
        photo = {"image": ("listing.jpg", listing.photo, "image/jpeg")}
        if endpoint == "image":
            request = httpx.Request("POST", url, files=photo)
        elif endpoint == "text":
            request = httpx.Request("POST", url, json={"text": listing.text})
        else:
            request = httpx.Request("POST", url, files=photo, data={"text": listing.text})
        body = request.read()
        head = (f"POST /{endpoint} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Content-Type: {request.headers['Content-Type']}\r\nContent-Length: {len(body)}\r\n\r\n")
        encoded.append(head.encode() + body)
    return encoded


class _Connection:
    """A keep-alive HTTP/1.1 connection that sends pre-encoded requests; httptools (C) parses the answers.

    The clients share the machine's cores with the server they measure: httpx spends about 3 ms of CPU per
    photo upload (its HTTP parser is pure Python), this a small fraction of that.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader, self._writer = reader, writer
        self._body: list[bytes] = []
        self._complete = False

    @classmethod
    async def open(cls, port: int) -> _Connection:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    def on_body(self, body: bytes) -> None:  # httptools callback
        self._body.append(body)

    def on_message_complete(self) -> None:  # httptools callback
        self._complete = True

    async def send(self, request: bytes) -> tuple[int, bytes]:
        """(status, body) of the answer to ``request``."""
        self._writer.write(request)
        parser = httptools.HttpResponseParser(self)
        self._body, self._complete = [], False
        while not self._complete:
            data = await self._reader.read(1 << 16)
            if not data:
                raise ConnectionError("the server closed the connection")
            parser.feed_data(data)
        return parser.get_status_code(), b"".join(self._body)

    def close(self) -> None:
        self._writer.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    command = [sys.executable, str(SERVE_SCRIPT), "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
               "--image-model", args.image_model, "--text-model", args.text_model,
               "--combined-model", args.combined_model, "--max-batch-size", str(args.max_batch_size),
               "--max-batch-wait-ms", str(args.max_batch_wait_ms), "--torch-threads", str(args.torch_threads)]
    if args.checkpoints is not None:
        command += ["--checkpoints", str(args.checkpoints)]
    if args.quantization is not None:
        command += ["--quantization", args.quantization]
    server = subprocess.Popen(command)
    wait_until_ready(server, f"http://127.0.0.1:{port}")
    return server


def wait_until_ready(server: subprocess.Popen, url: str, log: Path | None = None) -> None:
    """Poll ``<url>/ready`` until 200; stop (with the end of ``log``) if the server exits or takes too long."""
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            output = f":\n{log.read_text()[-3000:]}" if log is not None else ""
            raise SystemExit(f"the server exited with code {server.returncode} before it was ready{output}")
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    server.terminate()
    raise SystemExit(f"the server was not ready within {_READY_TIMEOUT_S} s")


async def _drive(port: int, run: Run, requests: list[bytes], n_requests: int) -> None:
    """Send ``n_requests`` from ``run.concurrency`` clients; add time, latencies and errors to ``run``."""
    next_index = 0

    async def one_client(client: int) -> None:
        nonlocal next_index
        while next_index < n_requests:
            request = requests[next_index % len(requests)]
            next_index += 1
            started = time.perf_counter()
            try:
                status, body = await connections[client].send(request)
                ok = status == 200 and bool(json.loads(body).get("pred"))
            except (OSError, httptools.HttpParserError, ValueError):
                ok = False
                connections[client].close()
                connections[client] = await _Connection.open(port)
            run.latencies_ms.append((time.perf_counter() - started) * 1000)
            run.errors += not ok

    connections = [await _Connection.open(port) for _ in range(run.concurrency)]
    try:
        # Warm-up: one request per connection, so the first batches have run; not measured.
        await asyncio.gather(*(connection.send(requests[0]) for connection in connections))
        started = time.perf_counter()
        await asyncio.gather(*(one_client(client) for client in range(run.concurrency)))
        run.served_seconds += time.perf_counter() - started
    finally:
        for connection in connections:
            connection.close()


def _table(runs: list[Run]) -> str:
    header = ["endpoint", "requests", "errors", "clients", "throughput (req/s)", "p50 (ms)", "p95 (ms)", "p99 (ms)",
              "in-process (req/s)", "served / in-process"]
    return markdown_table(header, [
        [f"/{run.endpoint}", run.requests, run.errors, run.concurrency, f"{run.throughput:.1f}",
         f"{run.percentile(50):.1f}", f"{run.percentile(95):.1f}", f"{run.percentile(99):.1f}",
         f"{run.in_process_per_s:.1f}", f"{run.ratio:.2f}"] for run in runs])


def _bar_failures(runs: list[Run]) -> list[str]:
    failures = []
    for run in runs:
        if run.errors:
            failures.append(f"/{run.endpoint}: {run.errors} errors")
        if run.endpoint in ("image", "combined") and run.ratio < SERVED_RATIO_BAR:
            failures.append(f"/{run.endpoint}: served throughput is {run.ratio:.2f} of in-process "
                            f"(bar {SERVED_RATIO_BAR})")
        if run.endpoint == "text" and run.percentile(50) >= run.p50_bar_ms:
            failures.append(f"/text: p50 {run.percentile(50):.1f} ms (bar {run.p50_bar_ms:.0f} ms)")
    return failures


def main() -> None:
    args = _parser().parse_args()
    if args.requests < MIN_REQUESTS:
        raise SystemExit(f"--requests must be at least {MIN_REQUESTS}")
    if args.checkpoints is not None:
        os.environ["MARKETPLACE_CHECKPOINTS"] = str(args.checkpoints.absolute())
    listings = _listings(args)
    models = {"image": args.image_model, "text": args.text_model, "combined": args.combined_model}

    report = BenchmarkReport("Serving benchmark", args.report or reports_dir() / "bench_serving.md")
    port = _free_port()
    server = _start_server(args, port)
    runs = []
    try:
        for endpoint, name in models.items():
            predictor = Predictor.from_pretrained(name, quantization=args.quantization)
            requests = _encoded_requests(endpoint, listings, port)
            run = Run(endpoint, args.text_concurrency if endpoint == "text" else args.concurrency,
                      model_type=predictor.model.model_type)
            # Rounds alternate in process (the server idles) and served, so that both meet the same load from
            # whatever else runs on the machine.
            for round_requests in np.array_split(np.arange(args.requests), args.rounds):
                run.in_process_rates.append(_best_in_process_per_s(predictor, listings, args))
                asyncio.run(_drive(port, run, requests, len(round_requests)))
                print(f"  served /{endpoint}: {run.requests} requests so far, {run.throughput:.1f} req/s", flush=True)
            runs.append(run)
            print(f"/{endpoint}: in process {run.in_process_per_s:.1f}/s, served {run.throughput:.1f} req/s, "
                  f"p50 {run.percentile(50):.1f} ms", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)

    table = _table(runs)
    failures = _bar_failures(runs)
    verdict = "all bars hold" if not failures else "bars missed: " + "; ".join(failures)
    setup = (f"Server {args.torch_threads} torch threads, max batch {args.max_batch_size}, max wait "
             f"{args.max_batch_wait_ms} ms, quantization {args.quantization or 'none'}; models: "
             + ", ".join(f"/{e} {n}" for e, n in models.items()))
    report.write(
        f"{setup}.\n\n{table}\n\n"
        "In-process: `Predictor.predict_batch` on encoded photos/texts (decoding included), batches of the "
        "server's max batch size, the better of the server's torch thread count and all cores. Served: one "
        "listing per request over HTTP from a separate server process, clients on the same machine. The two "
        f"alternate in {args.rounds} rounds per endpoint, so both meet the same load from other processes.\n\n"
        f"Bars: served >= {SERVED_RATIO_BAR} x in-process for /image and /combined, zero errors, "
        f"/text p50 < {next((r.p50_bar_ms for r in runs if r.endpoint == 'text'), TEXT_P50_BAR_MS):.0f} ms. "
        f"Result: {verdict}.\n")
    print(f"\n{setup}\n\n{table}\n\n{verdict}")
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
