"""Command line of the service: ``python -m marketplace_reco.serving`` (and ``scripts/serve.py``).

Arguments override the ``MARKETPLACE_*`` environment variables; once every model is loaded, example
``curl`` commands for this server are printed. API keys are read from the environment or a file only, never
from arguments, which every user of the machine can see in the process list.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shlex
from collections.abc import Sequence
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from .app import create_app
from .connections import uvicorn_config
from .settings import ServingSettings

_OVERRIDABLE = ("image_model", "image_model_revision", "text_model", "text_model_revision", "combined_model",
                "combined_model_revision", "host", "port", "max_body_bytes", "max_image_pixels",
                "max_request_pixels", "max_pixels_in_flight", "max_request_text_chars", "max_items_per_request",
                "max_batch_size", "max_batch_wait_ms", "max_queued_inputs", "inference_timeout_s",
                "header_timeout_s", "body_timeout_s", "keep_alive_timeout_s", "api_keys_file", "torch_threads",
                "index", "index_revision", "similar_model", "db_url", "quantization")
_ANNOUNCE_POLL_S = 0.2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Serve the marketplace category models over HTTP. Every option defaults to its "
                    "MARKETPLACE_<OPTION> environment variable (e.g. --image-model: MARKETPLACE_IMAGE_MODEL).")
    fields = ServingSettings.model_fields
    for name in _OVERRIDABLE:
        annotation = fields[name].annotation
        kind = int if annotation in (int, int | None) else float if annotation is float else str
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=fields[name].description)
    parser.add_argument("--extra-models", nargs="+", default=None, metavar="NAME",
                        help=fields["extra_models"].description)
    parser.add_argument("--checkpoints", type=Path, default=None,
                        help="folder of checkpoints that model names refer to (MARKETPLACE_CHECKPOINTS)")
    parser.add_argument("--example-photo", type=Path, default=None,
                        help="a photo to name in the example requests printed once ready, so they run as pasted "
                             "(default: photo.jpg)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def _examples(settings: ServingSettings, photo: str, needs_key: bool) -> str:
    base = f"http://{settings.host}:{settings.port}"
    lines = [f"marketplace_reco is ready on {base} (API docs: {base}/docs). Try:"]
    # Never the key itself: it would end up in logs.
    curl = "curl -H 'X-API-Key: <your key>'" if needs_key else "curl"
    if settings.image_model:
        lines.append(f"  {curl} -F image=@{photo} {base}/image")
    if settings.text_model:
        text = shlex.quote('{"text": "Grey three-seater sofa, barely used"}')
        lines.append(f"  {curl} -H 'Content-Type: application/json' -d {text} {base}/text")
    if settings.combined_model:
        lines.append(f"  {curl} -F image=@{photo} -F 'text=Grey three-seater sofa' {base}/combined")
    return "\n".join(lines)


async def _announce_when_ready(server: uvicorn.Server, app: FastAPI, examples: str) -> None:
    while not (server.started and app.state.pool.ready):
        await asyncio.sleep(_ANNOUNCE_POLL_S)
        failed = {name: status for name, status in app.state.pool.status.items() if status.startswith("failed")}
        if failed:
            logging.getLogger(__name__).error("not ready, see /ready: %s", failed)
            return
    print(examples, flush=True)


async def _serve(server: uvicorn.Server, app: FastAPI, examples: str) -> None:
    announcer = asyncio.create_task(_announce_when_ready(server, app, examples))
    try:
        await server.serve()
    finally:
        announcer.cancel()


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if args.checkpoints is not None:
        # The model loader resolves names under MARKETPLACE_CHECKPOINTS, as everywhere in the project.
        os.environ["MARKETPLACE_CHECKPOINTS"] = str(args.checkpoints.absolute())
    given = {name: getattr(args, name) for name in (*_OVERRIDABLE, "extra_models")}
    overrides = {name: value for name, value in given.items() if value is not None}
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = ServingSettings(**overrides)
        app = create_app(settings)
    except ValueError as exc:  # settings that cannot work (pydantic's ValidationError is one): say which, and stop
        raise SystemExit(f"error: {exc}") from None
    config = uvicorn_config(app, settings, log_level=args.log_level)
    server = uvicorn.Server(config)
    photo = shlex.quote(str(args.example_photo)) if args.example_photo else "photo.jpg"
    examples = _examples(settings, photo, needs_key=bool(settings.accepted_api_keys()))
    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(_serve(server, app, examples))
