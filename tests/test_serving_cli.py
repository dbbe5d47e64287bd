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


def _lines_until_ready(server: subprocess.Popen) -> str:
    """The server's output up to its example requests, which it prints once ready."""
    lines: list[str] = []
    deadline = time.monotonic() + 120
    while not any("curl" in line for line in lines):
        line = server.stdout.readline()  # type: ignore[union-attr]
        if not line or time.monotonic() > deadline:
            pytest.fail("the server exited or never said it was ready:\n" + "".join(lines))
        lines.append(line)
    return "".join(lines)


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
        output = _lines_until_ready(server)
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


def test_serve_script_with_api_keys_and_connection_timeouts(tmp_path: Path) -> None:
    """Keys from a file (never from arguments, never in the output, even at debug level); timeouts from arguments."""
    create_model("hog-svm", classes=["Fashion", "Toys"]).save_pretrained(tmp_path / "hog-svm")
    key = "cli-key-0123456789abcdef"
    keys_file = tmp_path / "keys"
    keys_file.write_text(key + "\n")
    port = _free_port()
    env = {**os.environ, "MARKETPLACE_API_KEYS_FILE": str(keys_file)}
    command = [sys.executable, str(REPO_ROOT / "scripts" / "serve.py"), "--checkpoints", str(tmp_path),
               "--image-model", "hog-svm", "--port", str(port), "--log-level", "debug", "--header-timeout-s", "1"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = _lines_until_ready(server)
        assert f"curl -H 'X-API-Key: <your key>' -F image=@photo.jpg http://127.0.0.1:{port}/image" in lines
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            assert client.get("/ready").status_code == 200
            photo = {"image": ("big.jpg", b"\xff" * 100, "image/jpeg")}
            assert client.post("/image", files=photo).status_code == 401
            assert client.post("/image", files=photo, headers={"X-API-Key": key[::-1]}).status_code == 401
            assert client.post("/image", files=photo, headers={"Authorization": f"Bearer {key}"}).status_code == 400
        with socket.create_connection(("127.0.0.1", port), timeout=30) as idle:
            started = time.monotonic()
            assert idle.recv(65536).startswith(b"HTTP/1.1 408")
            assert 0.9 <= time.monotonic() - started < 5
    finally:
        server.terminate()
        output = lines + server.communicate(timeout=30)[0]
    assert "GET /ready" in output  # the debug log was on
    assert key not in output and key[::-1] not in output
