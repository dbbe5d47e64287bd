"""``scripts/serve.py`` as a separate process: settings from the environment, overridden by arguments."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from marketplace_reco.models import create_model

REPO_ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_script_loads_models_by_name_and_prints_an_example(tmp_path: Path) -> None:
    create_model("hog-svm", classes=["Fashion", "Toys"]).save_pretrained(tmp_path / "hog-svm")
    port = _free_port()
    env = {**os.environ, "MARKETPLACE_IMAGE_MODEL": "not-this-one", "MARKETPLACE_MAX_BODY_BYTES": "5000",
           "MARKETPLACE_PORT": "1"}
    command = [sys.executable, str(REPO_ROOT / "scripts" / "serve.py"), "--checkpoints", str(tmp_path),
               "--image-model", "hog-svm", "--port", str(port), "--log-level", "warning", "--example-photo",
               "data/images/my photo.jpg"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while not any("curl" in line for line in lines):
            line = server.stdout.readline()  # type: ignore[union-attr]
            if not line or time.monotonic() > deadline:
                pytest.fail("the server exited or never said it was ready:\n" + "".join(lines))
            lines.append(line)
        output = "".join(lines)
        assert f"ready on http://127.0.0.1:{port}" in output
        assert f"curl -F image=@'data/images/my photo.jpg' http://127.0.0.1:{port}/image" in output
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            assert client.get("/ready").json() == {"ready": True, "models": {"hog-svm": "ready"}}
            # The body limit came from the environment.
            response = client.post("/image", files={"image": ("big.jpg", b"\xff" * 6000, "image/jpeg")})
            assert response.status_code == 413
            assert "5,000 bytes" in response.json()["error"]["message"]
    finally:
        server.terminate()
        server.wait(timeout=30)
