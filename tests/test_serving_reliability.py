"""Issue 19 over real HTTP: per-request budgets, deadlines, connection timeouts, API keys, consistent refusals.

Raw sockets play the clients that httpx would never be: a head sent byte by byte, a body that stops, a head
that never ends. Servers here run with small limits and short timeouts (seconds), so that each case takes
about one timeout; the servers and models come from test_serving_http.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import select
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from marketplace_reco.serving import ServingSettings, create_app
from test_predictor import overflowing_image_classifier
from test_serving_http import CLASSES, RED, LoopbackServer, error_message, png_header_only, save_tiny_checkpoints

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
MAX_ITEMS = 4
MAX_IMAGE_PIXELS = 1_000_000
MAX_REQUEST_PIXELS = 1_500_000
MAX_TEXT_CHARS = 2_000
#: How late a deadline may act on a busy 2-core machine and still count as on time; how early, as timers go.
SLACK_S = 3.0
EARLY_S = 0.1
API_KEY = "env-key-0123456789abcdef"
FILE_KEY = "file-key-0123456789abcdef"
BIG_PHOTO = png_header_only(800, 800)  # 640,000 pixels, and no pixel data: decoding it fails


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tiny models, and one whose finite weights overflow to probabilities that are not numbers."""
    folder = save_tiny_checkpoints(tmp_path_factory.mktemp("checkpoints"))
    overflowing_image_classifier(CLASSES).save_pretrained(folder / "overflowing")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MARKETPLACE_CHECKPOINTS", str(folder))
        yield folder


@contextmanager
def _serving(**settings: object) -> Iterator[LoopbackServer]:
    with LoopbackServer(create_app(ServingSettings(torch_threads=1, **settings))) as server:
        server.wait_ready()
        yield server


@pytest.fixture(scope="module")
def guarded(checkpoints: Path) -> Iterator[LoopbackServer]:
    """A server with small budgets and one-second connection timeouts; no warm-up, so 'overflowing' loads."""
    with _serving(image_model="image-classifier", text_model="text-cnn", combined_model="fusion",
                  extra_models=["overflowing"], warmup=False, max_items_per_request=MAX_ITEMS,
                  max_image_pixels=MAX_IMAGE_PIXELS, max_request_pixels=MAX_REQUEST_PIXELS,
                  max_request_text_chars=MAX_TEXT_CHARS, header_timeout_s=HEADER_TIMEOUT_S,
                  body_timeout_s=BODY_TIMEOUT_S) as server:
        yield server


@pytest.fixture
def client(guarded: LoopbackServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=guarded.url, timeout=60) as http:
        yield http


# ---- raw connections ----------------------------------------------------------------------------
def _connect(server: LoopbackServer) -> socket.socket:
    return socket.create_connection(server.address, timeout=30)


def _read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """All the server sent until it closed the connection, and when it closed it (time.monotonic)."""
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except ConnectionResetError:  # closed with bytes of ours unread: a reset, after the answer
        pass
    return b"".join(chunks), time.monotonic()


def _parse(answer: bytes) -> tuple[int, dict[str, str], dict]:
    """Status, headers and JSON error of a raw HTTP/1.1 answer."""
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value for name, value in (line.split(": ", 1) for line in header_lines)}
    return int(status_line.split()[1]), headers, json.loads(body)["error"]


def _trickle(sock: socket.socket, data: bytes, interval_s: float) -> int:
    """Send ``data`` a byte at a time until the server answers or closes; how many bytes went out."""
    for sent in range(len(data)):
        if select.select([sock], [], [], interval_s)[0]:
            return sent
        try:
            sock.send(data[sent:sent + 1])
        except OSError:
            return sent
    return len(data)


# ---- failure 4: no timeouts ---------------------------------------------------------------------
def test_a_head_sent_byte_by_byte_is_cut_off_at_the_header_timeout_while_others_are_served(
        guarded: LoopbackServer, client: httpx.Client) -> None:
    head = b"POST /text HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nX-Pad: " + b"x" * 60
    with _connect(guarded) as sock:
        started = time.monotonic()
        sock.send(head[:10])
        assert client.post("/text", json={"text": "phone charger"}).status_code == 200  # meanwhile
        sent = 10 + _trickle(sock, head[10:], 0.05)  # the whole head would take 6 s
        answer, closed = _read_until_closed(sock)
    assert sent < len(head)
    assert HEADER_TIMEOUT_S - EARLY_S <= closed - started < HEADER_TIMEOUT_S + SLACK_S
    status, headers, error = _parse(answer)
    assert (status, error["code"], headers["connection"]) == (408, "header_timeout", "close")
    assert f"within {HEADER_TIMEOUT_S:g} s" in error["message"]


def test_a_connection_that_sends_nothing_is_closed_at_the_header_timeout(guarded: LoopbackServer) -> None:
    with _connect(guarded) as sock:
        started = time.monotonic()
        answer, closed = _read_until_closed(sock)
    assert HEADER_TIMEOUT_S - EARLY_S <= closed - started < HEADER_TIMEOUT_S + SLACK_S
    assert _parse(answer)[0] == 408


def test_a_later_request_on_a_kept_alive_connection_has_its_own_header_deadline(guarded: LoopbackServer) -> None:
    with _connect(guarded) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.")  # and then nothing
        answer, closed = _read_until_closed(sock)
    assert HEADER_TIMEOUT_S - EARLY_S <= closed - started < HEADER_TIMEOUT_S + SLACK_S
    assert _parse(answer)[2]["code"] == "header_timeout"


def test_a_head_larger_than_the_limit_is_refused(guarded: LoopbackServer, client: httpx.Client) -> None:
    with _connect(guarded) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: " + b"x" * 200_000)
        answer, _ = _read_until_closed(sock)
    status, _, error = _parse(answer)
    assert (status, error["code"]) == (431, "header_too_large")
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize(("head", "partial_body"), [
    (b"POST /text HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n",
     b'{"text": "a pho'),
    ((b"POST /image HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
      b"Content-Length: 5000\r\n\r\n"),
     b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n' + RED[:100]),
])
def test_a_body_that_stops_midway_is_answered_408_and_closed_at_the_body_timeout(
        guarded: LoopbackServer, head: bytes, partial_body: bytes) -> None:
    with _connect(guarded) as sock:
        sock.sendall(head + partial_body)
        started = time.monotonic()
        answer, closed = _read_until_closed(sock)
    assert BODY_TIMEOUT_S - EARLY_S <= closed - started < BODY_TIMEOUT_S + SLACK_S
    status, headers, error = _parse(answer)
    assert (status, error["code"], headers["connection"]) == (408, "body_timeout", "close")


def test_a_body_still_arriving_after_its_answer_has_the_body_timeout(guarded: LoopbackServer) -> None:
    """Nobody reads it, and uvicorn would keep the connection for as long as the client trickles it."""
    with _connect(guarded) as sock:
        sock.sendall(b"POST /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000\r\n\r\nabc")
        answer = sock.recv(65536)
        answered = time.monotonic()
        status, _, error = _parse(answer)
        assert (status, error["code"]) == (404, "not_found")
        sent = _trickle(sock, b"x" * 100, 0.05)  # would take 5 s
        _, closed = _read_until_closed(sock)
    assert sent < 100
    assert BODY_TIMEOUT_S - EARLY_S <= closed - answered < BODY_TIMEOUT_S + SLACK_S


def test_a_body_that_ends_after_its_answer_leaves_the_connection_usable_and_timed(guarded: LoopbackServer) -> None:
    head = b"POST /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 6\r\n\r\nabc"
    with _connect(guarded) as sock:
        sock.sendall(head)
        assert sock.recv(65536).startswith(b"HTTP/1.1 404")
        sock.sendall(b"def" + b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    with _connect(guarded) as sock:
        sock.sendall(head)
        assert sock.recv(65536).startswith(b"HTTP/1.1 404")
        sock.sendall(b"def")  # and then no next request: its head is timed from here
        started = time.monotonic()
        answer, closed = _read_until_closed(sock)
    assert HEADER_TIMEOUT_S - EARLY_S <= closed - started < HEADER_TIMEOUT_S + SLACK_S
    assert _parse(answer)[2]["code"] == "header_timeout"


def test_a_prediction_past_its_deadline_is_503_with_retry_after(checkpoints: Path) -> None:
    # Every micro-batch waits 500 ms to fill up: longer than the 100 ms deadline.
    with _serving(text_model="text-cnn", max_batch_wait_ms=500, inference_timeout_s=0.1) as server:
        response = httpx.post(f"{server.url}/text", json={"text": "phone charger"})
        assert "within 0.1 s" in error_message(response, 503, "inference_timeout")
        assert response.headers["retry-after"] == "1"
        assert httpx.get(f"{server.url}/health").status_code == 200


def test_a_full_queue_sheds_load_with_503_and_retry_after(checkpoints: Path) -> None:
    long_text = "phone charger sofa table dress " * 1600  # about 50,000 characters: a slow model call
    with _serving(text_model="text-cnn", max_items_per_request=2, max_queued_inputs=2, max_batch_size=1) as server:
        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
                return await asyncio.gather(*(http.post("/text/batch", json={"texts": [long_text] * 2})
                                              for _ in range(12)))

        responses = asyncio.run(burst())
    statuses = [response.status_code for response in responses]
    assert set(statuses) == {200, 503}, statuses
    for response in responses:
        if response.status_code == 503:
            assert "at most 2" in error_message(response, 503, "overloaded")
            assert response.headers["retry-after"] == "1"


# ---- failure 2 and 3: memory and time per request ------------------------------------------------
def test_the_pixels_of_a_request_are_budgeted_from_the_headers_before_any_decoding(client: httpx.Client) -> None:
    photos = [("image", (f"{i}.png", BIG_PHOTO, "image/png")) for i in range(3)]
    message = error_message(client.post("/image/batch", files=photos), 413, "too_many_pixels")
    assert "1,920,000 pixels" in message and f"{MAX_REQUEST_PIXELS:,}" in message
    # Two fit in the budget, so decoding is tried, and fails: the 413 came before any decoding.
    assert "0.png" in error_message(client.post("/image/batch", files=photos[:2]), 400, "bad_image")


def test_a_photo_over_the_pixel_limit_is_refused_before_the_others_are_decoded(client: httpx.Client) -> None:
    photos = [("image", ("fine.png", BIG_PHOTO, "image/png")), ("image", ("huge.png", png_header_only(1100, 1000)))]
    message = error_message(client.post("/image/batch", files=photos), 413, "image_too_large")
    assert "huge.png has 1,100,000 pixels" in message


@pytest.mark.parametrize(("path", "request_kwargs"), [
    ("/text", {"json": {"text": "x" * (MAX_TEXT_CHARS + 1)}}),
    ("/text", {"data": {"text": "x" * (MAX_TEXT_CHARS + 1)}}),
    ("/text", {"files": {"text": (None, "x" * (MAX_TEXT_CHARS + 1))}}),
    ("/text/batch", {"json": {"texts": ["x" * 1000, "x" * 1001]}}),
    ("/text/batch", {"data": {"text": ["x" * 1000, "x" * 1001]}}),
    ("/combined", {"files": {"image": RED}, "data": {"text": "x" * (MAX_TEXT_CHARS + 1)}}),
])
def test_the_text_budget_is_the_same_for_json_and_forms(client: httpx.Client, path: str,
                                                        request_kwargs: dict) -> None:
    """Issue 19: a 19 MB JSON text was accepted (and stalled /text for 10 s) while form fields stopped at 1 MB."""
    message = error_message(client.post(path, **request_kwargs), 413, "text_too_long")
    assert f"{MAX_TEXT_CHARS + 1:,} characters" in message


def test_texts_within_the_budget_are_answered(client: httpx.Client) -> None:
    assert client.post("/text", json={"text": "phone " * (MAX_TEXT_CHARS // 6)}).status_code == 200
    texts = ["sofa " * 200, "dress " * 150]
    assert len(client.post("/text/batch", data={"text": texts}).json()["predictions"]) == 2


# ---- failure 6 (serving): no probability that is not a number -----------------------------------
def test_probabilities_that_are_not_finite_are_never_served(client: httpx.Client,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="marketplace_reco.serving"):
        response = client.post("/image", params={"model": "overflowing"}, files={"image": RED})
    message = error_message(response, 500, "model_output_invalid")
    assert "'overflowing'" in message and "not finite" in message
    assert "not finite" in caplog.text
    assert client.post("/image", files={"image": RED}).status_code == 200  # other models still answer


def test_a_model_whose_probabilities_are_not_finite_fails_its_warm_up(checkpoints: Path) -> None:
    settings = ServingSettings(image_model="overflowing", torch_threads=1)
    with LoopbackServer(create_app(settings)) as server, pytest.raises(RuntimeError, match="not finite"):
        server.wait_ready()


# ---- failure 7: small inconsistencies -----------------------------------------------------------
def test_an_empty_model_name_is_refused_not_taken_for_the_default(client: httpx.Client) -> None:
    assert "query.model" in error_message(client.post("/image?model=", files={"image": RED}), 422, "invalid_request")
    assert "query.model" in error_message(client.post("/text?model=", json={"text": "a"}), 422, "invalid_request")


@pytest.mark.parametrize(("path", "request_kwargs", "says"), [
    ("/text", {"files": {"text": (None, "caf\xe9 sofa".encode("latin-1"))}}, "'text' is not UTF-8"),
    ("/text", {"files": {"txt": (None, b"\xff\xfe")}}, "'txt' is not UTF-8"),
    ("/combined", {"files": {"image": RED, "text": (None, "caf\xe9".encode("cp1252"))}}, "'text' is not UTF-8"),
    ("/text", {"content": b"text=caf%E9+sofa", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
     "'text' is not UTF-8"),
    ("/text", {"content": b"text=caf\xe9", "headers": {"Content-Type": "application/x-www-form-urlencoded"}},
     "the form is not UTF-8"),
])
def test_form_text_that_is_not_utf8_is_refused_with_the_field(client: httpx.Client, path: str, request_kwargs: dict,
                                                              says: str) -> None:
    assert says in error_message(client.post(path, **request_kwargs), 422, "invalid_input")


def test_utf8_form_text_is_read_as_sent(client: httpx.Client) -> None:
    accented = "Café table, très bon état"
    by_json = client.post("/text", json={"text": accented}).json()
    for request_kwargs in ({"data": {"text": accented}}, {"files": {"text": (None, accented.encode())}},
                           {"content": f"text={accented}".encode(),
                            "headers": {"Content-Type": "application/x-www-form-urlencoded"}}):
        assert client.post("/text", **request_kwargs).json() == by_json


# ---- failure 5: optional API keys ---------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed(checkpoints: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackServer]:
    keys_file = tmp_path_factory.mktemp("keys") / "api_keys"
    keys_file.write_text(f"# keys of the shop's back office\n\n{FILE_KEY}\n")
    with _serving(image_model="image-classifier", text_model="text-cnn", api_keys=[API_KEY],
                  api_keys_file=keys_file) as server:
        yield server


@pytest.mark.parametrize(("method", "path", "request_kwargs"), [
    ("POST", "/image", {"files": {"image": RED}}),
    ("POST", "/text", {"json": {"text": "phone"}}),
    ("POST", "/text/batch", {"json": {"texts": ["phone"]}}),
    ("GET", "/models", {}),
    ("GET", "/models/text-cnn", {}),
    ("GET", "/metrics", {}),
])
def test_with_keys_every_route_but_health_needs_one(keyed: LoopbackServer, method: str, path: str,
                                                   request_kwargs: dict) -> None:
    with httpx.Client(base_url=keyed.url, timeout=60) as http:
        missing = http.request(method, path, **request_kwargs)
        assert "X-API-Key" in error_message(missing, 401, "unauthorized")
        assert missing.headers["www-authenticate"] == "Bearer"
        for wrong in ({"Authorization": f"Bearer {API_KEY}x"}, {"X-API-Key": FILE_KEY[:-1]},
                      {"Authorization": f"Basic {API_KEY}"}):
            error_message(http.request(method, path, headers=wrong, **request_kwargs), 401, "unauthorized")
        for good in ({"Authorization": f"Bearer {API_KEY}"}, {"X-API-Key": API_KEY},
                     {"Authorization": f"Bearer {FILE_KEY}"}, {"X-API-Key": FILE_KEY}):
            assert http.request(method, path, headers=good, **request_kwargs).status_code == 200


def test_with_keys_health_readiness_and_docs_stay_open(keyed: LoopbackServer) -> None:
    with httpx.Client(base_url=keyed.url) as http:
        assert http.get("/health").status_code == 200
        assert http.get("/ready").json()["ready"] is True
        assert http.get("/docs").status_code == 200
        schema = http.get("/openapi.json").json()
    assert set(schema["components"]["securitySchemes"]) == {"HTTPBearer", "APIKeyHeader"}
    assert "security" in schema["paths"]["/image"]["post"] and "security" not in schema["paths"]["/ready"]["get"]


def test_without_a_key_the_body_is_never_read(keyed: LoopbackServer) -> None:
    with _connect(keyed) as sock:
        sock.sendall(b"POST /text HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n{\"text\": ")  # the rest never comes
        status, headers, error = _parse(sock.recv(65536))
    assert (status, error["code"], headers["www-authenticate"]) == (401, "unauthorized", "Bearer")


def test_api_keys_come_comma_separated_as_json_or_from_a_file(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MARKETPLACE_API_KEYS", f" {API_KEY} , {FILE_KEY},")
    assert [key.get_secret_value() for key in ServingSettings().accepted_api_keys()] == [API_KEY, FILE_KEY]
    monkeypatch.setenv("MARKETPLACE_API_KEYS", json.dumps([API_KEY]))
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"{FILE_KEY}\n  # a comment\n\n")
    monkeypatch.setenv("MARKETPLACE_API_KEYS_FILE", str(keys_file))
    settings = ServingSettings()
    assert [key.get_secret_value() for key in settings.accepted_api_keys()] == [API_KEY, FILE_KEY]
    assert API_KEY not in repr(settings) and API_KEY not in str(settings.model_dump())


def test_bad_api_keys_are_refused_at_start_without_showing_them(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="1 of the 2 API keys are shorter than 16") as short:
        ServingSettings(api_keys=[API_KEY, "secret-short"]).accepted_api_keys()
    assert "secret-short" not in str(short.value)
    with pytest.raises(ValueError, match="cannot read the API keys file"):
        ServingSettings(api_keys_file=tmp_path / "missing").accepted_api_keys()
    (tmp_path / "empty").write_text("# nothing yet\n")
    with pytest.raises(ValueError, match="holds no key"):
        ServingSettings(api_keys_file=tmp_path / "empty").accepted_api_keys()
    monkeypatch.setenv("MARKETPLACE_API_KEYS", '["unterminated-secret-value')
    with pytest.raises(ValueError) as malformed:
        ServingSettings()
    assert "unterminated-secret-value" not in str(malformed.value)
