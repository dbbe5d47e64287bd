"""The HTTP service over real HTTP: uvicorn on a loopback port, tiny real models, httpx clients.

Covers every endpoint, the original clients' field names, batch variants, every bad-input case (each a
JSON error, never a 500), readiness, metrics and a concurrent burst. Limits, deadlines and API keys:
test_serving_reliability.py, which shares this module's server and models.
"""

from __future__ import annotations

import asyncio
import io
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from PIL import Image

from marketplace_reco.data.text import TextPreprocessor
from marketplace_reco.models import create_model
from marketplace_reco.models.fusion import FusionClassifier
from marketplace_reco.serving import Predictor, ServingSettings, create_app
from marketplace_reco.serving.connections import uvicorn_config

CLASSES = ["Electronics", "Fashion", "Home & Garden"]
VOCABULARY = ["<pad>", "<unk>", "phone", "charger", "dress", "sofa", "tabl"]
MAX_BODY_BYTES = 256 * 1024
MAX_IMAGE_PIXELS = 1_000_000
MAX_ITEMS = 8


class LoopbackServer:
    """uvicorn serving ``app`` in a background thread on a free 127.0.0.1 port, configured as the CLI does."""

    def __init__(self, app: FastAPI) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.address = self._socket.getsockname()
        self.url = f"http://127.0.0.1:{self.address[1]}"
        self._server = uvicorn.Server(uvicorn_config(app, app.state.settings, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    def __enter__(self) -> LoopbackServer:
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self._socket.close()

    def wait_ready(self, timeout_s: float = 120) -> list[int]:
        """Poll ``/ready`` until 200; the status codes seen on the way."""
        seen = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            response = httpx.get(f"{self.url}/ready")
            seen.append(response.status_code)
            if response.status_code == 200:
                return seen
            if "failed" in response.text:
                raise RuntimeError(f"a model failed to load: {response.text}")
            time.sleep(0.02)
        raise TimeoutError(f"not ready after {timeout_s} s: {httpx.get(f'{self.url}/ready').text}")


def jpeg(color: tuple[int, int, int], size: tuple[int, int] = (96, 64)) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", size, color)
    image.paste((255 - color[0], color[1], 255 - color[2]), (10, 10, size[0] // 2, size[1] // 2))
    image.save(buffer, "JPEG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that claims ``width`` x ``height`` pixels: a decompression bomb's calling card."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


RED, GREEN = jpeg((200, 30, 30)), jpeg((30, 200, 60))


def save_tiny_checkpoints(folder: Path) -> Path:
    """Tiny untrained checkpoints of every served kind in ``folder``, to be loaded by name like trained ones."""
    image = create_model("image-classifier", classes=CLASSES, backbone="test_resnet", preprocessing={"image_size": 32},
                         feature_dim=8)
    text = create_model("text-cnn", classes=CLASSES, vocabulary=VOCABULARY,
                        preprocessing=TextPreprocessor().to_config(), embedding_dim=8, max_length=16,
                        kernel_sizes=[1, 2], num_filters=4, feature_dim=8)
    image.save_pretrained(folder / "image-classifier")
    text.save_pretrained(folder / "text-cnn")
    FusionClassifier.from_branches(image, text).save_pretrained(folder / "fusion")
    create_model("hog-svm", classes=CLASSES).save_pretrained(folder / "hog-svm")
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="module")
def settings(checkpoints: Path) -> Iterator[ServingSettings]:
    with pytest.MonkeyPatch.context() as env:
        env.setenv("MARKETPLACE_CHECKPOINTS", str(checkpoints))
        yield ServingSettings(image_model="image-classifier", text_model="text-cnn", combined_model="fusion",
                              extra_models=["hog-svm"], max_body_bytes=MAX_BODY_BYTES,
                              max_image_pixels=MAX_IMAGE_PIXELS, max_items_per_request=MAX_ITEMS,
                              max_batch_size=16, max_batch_wait_ms=20, torch_threads=1)


@pytest.fixture(scope="module")
def server(settings: ServingSettings) -> Iterator[LoopbackServer]:
    with LoopbackServer(create_app(settings)) as running:
        running.first_ready_statuses = running.wait_ready()  # type: ignore[attr-defined]
        yield running


@pytest.fixture
def client(server: LoopbackServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as http:
        yield http


def error_message(response: httpx.Response, status: int, code: str) -> str:
    """The message of a JSON error, after checking its status and code."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    return error["message"]


# ---- health, readiness, models ------------------------------------------------------------------
def test_ready_is_503_while_models_load_then_200(server: LoopbackServer, client: httpx.Client) -> None:
    statuses = server.first_ready_statuses  # type: ignore[attr-defined]
    assert statuses[0] == 503 and statuses[-1] == 200
    assert client.get("/health").json() == {"status": "ok"}
    models = {name: "ready" for name in ("image-classifier", "text-cnn", "fusion", "hog-svm")}
    assert client.get("/ready").json() == {"ready": True, "models": models}


def test_models_list_and_one_model(client: httpx.Client) -> None:
    listed = client.get("/models").json()["models"]
    assert [model["name"] for model in listed] == ["image-classifier", "text-cnn", "fusion", "hog-svm"]
    one = client.get("/models/image-classifier").json()
    assert one == listed[0]
    assert one["model_type"] == "image-classifier" and one["input_kind"] == "image"
    assert one["classes"] == CLASSES and one["endpoints"] == ["/image"]
    assert one["preprocessing"]["image_size"] == 32 and len(one["revision"]) >= 8
    assert "metrics" in one
    assert [(m["model_type"], m["input_kind"], m["endpoints"]) for m in listed[1:]] == [
        ("text-cnn", "text", ["/text"]), ("fusion", "image+text", ["/combined"]), ("hog-svm", "image", [])]


def test_unknown_model_is_404(client: httpx.Client) -> None:
    assert "nope" in error_message(client.get("/models/nope"), 404, "unknown_model")
    assert "user/repo" in error_message(client.get("/models/user/repo"), 404, "unknown_model")
    error_message(client.post("/image", params={"model": "nope"}, files={"image": RED}), 404, "unknown_model")


def test_openapi_documents_the_endpoints(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in ("/image", "/image/batch", "/text", "/text/batch", "/combined", "/combined/batch"):
        assert "multipart/form-data" in paths[path]["post"]["requestBody"]["content"]
    assert "application/json" in paths["/text"]["post"]["requestBody"]["content"]
    assert client.get("/docs").status_code == 200


# ---- predictions --------------------------------------------------------------------------------
def test_image_prediction_is_the_python_predictors(client: httpx.Client, checkpoints: Path) -> None:
    answer = client.post("/image", files={"image": ("red.jpg", RED, "image/jpeg")}).json()
    expected = Predictor.from_pretrained(str(checkpoints / "image-classifier")).predict(image=RED)
    assert answer["pred"] == answer["classes"][0] == expected.pred
    assert sorted(answer["classes"]) == CLASSES
    assert list(answer["probabilities"]) == answer["classes"]
    assert answer["probabilities"] == pytest.approx(expected.probabilities, abs=1e-5)
    assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert answer["model"] == "image-classifier" and answer["revision"] == expected.revision


def test_original_clients_field_name_img(client: httpx.Client) -> None:
    by_image = client.post("/image", files={"image": RED}).json()
    by_img = client.post("/image", files={"img": ("photo", RED)}).json()  # no declared type: decoded anyway
    assert by_img == by_image


def test_image_batch_answers_each_photo_in_order(client: httpx.Client) -> None:
    single = [client.post("/image", files={"image": photo}).json() for photo in (RED, GREEN)]
    files = [("image", ("a.jpg", RED, "image/jpeg")), ("img", ("b.jpg", GREEN, "image/jpeg")),
             ("image", ("c.jpg", RED, "image/jpeg"))]
    batch = client.post("/image/batch", files=files).json()["predictions"]
    assert len(batch) == 3
    for answer, expected in zip(batch, (single[0], single[1], single[0]), strict=True):
        assert answer["probabilities"] == pytest.approx(expected["probabilities"], abs=1e-5)


def test_another_served_model_answers_when_named(client: httpx.Client, checkpoints: Path) -> None:
    answer = client.post("/image", params={"model": "hog-svm"}, files={"image": RED}).json()
    expected = Predictor.from_pretrained(str(checkpoints / "hog-svm")).predict(image=RED)
    assert answer["model"] == "hog-svm"
    assert answer["probabilities"] == pytest.approx(expected.probabilities, abs=1e-6)


@pytest.mark.parametrize("request_kwargs", [
    {"json": {"text": "Phone charger, barely used"}},
    {"json": {"txt": "Phone charger, barely used"}},
    {"data": {"text": "Phone charger, barely used"}},  # url-encoded form
    {"data": {"txt": "Phone charger, barely used"}},
    {"files": {"text": (None, "Phone charger, barely used")}},  # multipart form field
])
def test_text_as_json_or_form_with_either_field_name(client: httpx.Client, checkpoints: Path,
                                                     request_kwargs: dict) -> None:
    answer = client.post("/text", **request_kwargs).json()
    expected = Predictor.from_pretrained(str(checkpoints / "text-cnn")).predict(text="Phone charger, barely used")
    assert answer["pred"] == expected.pred and answer["model"] == "text-cnn"
    assert answer["probabilities"] == pytest.approx(expected.probabilities, abs=1e-5)
    assert answer["known_tokens"] == 2 and answer["warning"] is None


def test_text_without_a_known_word_says_so(client: httpx.Client) -> None:
    answer = client.post("/text", json={"text": "zzz qqq"}).json()
    assert answer["known_tokens"] == 0 and "no word of the text is known" in answer["warning"]


def test_text_batch_as_json_or_form(client: httpx.Client) -> None:
    texts = ["red dress", "sofa and table", "phone"]
    singles = [client.post("/text", json={"text": text}).json() for text in texts]
    for response in (client.post("/text/batch", json={"texts": texts}),
                     client.post("/text/batch", data={"text": texts})):
        batch = response.json()["predictions"]
        assert [p["pred"] for p in batch] == [p["pred"] for p in singles]
        assert [p["known_tokens"] for p in batch] == [1, 2, 1]


def test_combined_with_either_field_names(client: httpx.Client, checkpoints: Path) -> None:
    photo = ("red.jpg", RED, "image/jpeg")
    by_new = client.post("/combined", files={"image": photo}, data={"text": "red dress"}).json()
    by_old = client.post("/combined", files={"img": photo}, data={"txt": "red dress"}).json()
    assert by_new == by_old
    expected = Predictor.from_pretrained(str(checkpoints / "fusion")).predict(image=RED, text="red dress")
    assert by_new["pred"] == expected.pred and by_new["model"] == "fusion"
    assert by_new["probabilities"] == pytest.approx(expected.probabilities, abs=1e-5)
    assert by_new["known_tokens"] == 1 and by_new["warning"] is None
    unknown = client.post("/combined", files={"image": photo}, data={"text": "zzz qqq"}).json()
    assert unknown["known_tokens"] == 0 and "rests on the photos alone" in unknown["warning"]


def test_combined_batch_pairs_the_ith_photo_with_the_ith_text(client: httpx.Client) -> None:
    pairs = [(RED, "red dress"), (GREEN, "sofa"), (RED, "phone charger")]
    singles = [client.post("/combined", files={"image": photo}, data={"text": text}).json() for photo, text in pairs]
    batch = client.post("/combined/batch", files=[("image", photo) for photo, _ in pairs],
                        data={"text": [text for _, text in pairs]}).json()["predictions"]
    for answer, single in zip(batch, singles, strict=True):
        assert answer["probabilities"] == pytest.approx(single["probabilities"], abs=1e-5)


# ---- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("request_kwargs", "status", "code", "says"), [
    ({"files": {"image": ("x.jpg", b"this is not an image", "image/jpeg")}}, 400, "bad_image", "x.jpg"),
    ({"files": {"image": ("cut.jpg", RED[: len(RED) // 2], "image/jpeg")}}, 400, "bad_image", "cut.jpg"),
    ({"files": {"image": ("empty.jpg", b"", "image/jpeg")}}, 400, "bad_image", "empty.jpg"),
    ({"files": {"image": ("big.png", png_header_only(5_000, 5_000), "image/png")}}, 413, "image_too_large",
     "25,000,000 pixels"),
    ({"files": {"image": ("bomb.png", png_header_only(30_000, 30_000), "image/png")}}, 413, "image_too_large",
     "decompression bomb"),
    ({"files": {"image": ("notes.txt", b"hello", "text/plain")}}, 415, "unsupported_media_type", "text/plain"),
    ({"json": {"image": "aGVsbG8="}}, 415, "unsupported_media_type", "application/json"),
    ({"content": RED}, 415, "unsupported_media_type", "without Content-Type"),
    ({"files": {"photo": RED}}, 422, "invalid_input", "'image'"),
    ({"data": {"image": "not a file"}}, 422, "invalid_input", "file upload"),
])
def test_bad_image_requests(client: httpx.Client, request_kwargs: dict, status: int, code: str, says: str) -> None:
    assert says in error_message(client.post("/image", **request_kwargs), status, code)


@pytest.mark.parametrize(("request_kwargs", "status", "code", "says"), [
    ({"json": {"text": ""}}, 422, "invalid_input", "empty"),
    ({"json": {"text": "   "}}, 422, "invalid_input", "empty"),
    ({"data": {"text": ""}}, 422, "invalid_input", "empty"),
    ({"json": {}}, 422, "invalid_request", "body.text"),
    ({"json": {"text": 42}}, 422, "invalid_request", "string"),
    ({"content": b'{"text": "unterminated', "headers": {"Content-Type": "application/json"}}, 422, "invalid_request",
     "JSON"),
    ({"data": {"other": "a phone"}}, 422, "invalid_input", "'text'"),
    ({"files": {"text": ("notes.txt", b"a phone", "text/plain")}}, 422, "invalid_input", "not a file"),
    ({"content": b"a phone", "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_media_type", "text/plain"),
    ({"content": b"a phone"}, 415, "unsupported_media_type", "without Content-Type"),
    ({"json": {"text": "a phone"}, "params": {"model": "image-classifier"}}, 422, "invalid_input", "'image'"),
])
def test_bad_text_requests(client: httpx.Client, request_kwargs: dict, status: int, code: str, says: str) -> None:
    assert says in error_message(client.post("/text", **request_kwargs), status, code)


@pytest.mark.parametrize(("path", "request_kwargs", "says"), [
    ("/combined", {"data": {"other": "a phone"}, "files": {"other": RED}}, "'image'"),
    ("/combined", {"files": {"image": RED}, "data": {"text": ["a phone", "a dress"]}}, "one text"),
    ("/combined/batch", {"files": [("image", RED), ("image", GREEN)], "data": {"text": "a phone"}},
     "pairs the i-th photo with the i-th text"),
    ("/text/batch", {"json": {"texts": []}}, "at least 1"),
])
def test_bad_combined_and_batch_requests(client: httpx.Client, path: str, request_kwargs: dict, says: str) -> None:
    response = client.post(path, **request_kwargs)
    assert response.status_code == 422, response.text
    assert says in response.json()["error"]["message"]


@pytest.mark.parametrize(("path", "request_kwargs", "says"), [
    ("/image/batch", {"files": [("image", RED)] * (MAX_ITEMS + 1)}, f"at most {MAX_ITEMS} images"),
    ("/text/batch", {"json": {"texts": ["phone"] * (MAX_ITEMS + 1)}}, f"at most {MAX_ITEMS} texts"),
    ("/text/batch", {"data": {"text": ["phone"] * (MAX_ITEMS + 1)}}, f"at most {MAX_ITEMS} texts"),
    ("/text/batch", {"files": [("text", (None, "phone"))] * (MAX_ITEMS + 1)}, f"at most {MAX_ITEMS} texts"),
    ("/combined/batch", {"files": [("image", RED)] * 2, "data": {"text": ["phone"] * (MAX_ITEMS + 1)}},
     f"at most {MAX_ITEMS} texts"),
    ("/text/batch", {"data": {"text": "phone", "other": ["x"] * (MAX_ITEMS + 1)}}, f"at most {MAX_ITEMS} other"),
    ("/text/batch", {"data": {"text": "phone", "other": ["x"] * (3 * MAX_ITEMS)}}, "other fields per request"),
])
def test_too_many_inputs_is_one_status_and_code_for_photos_and_texts_form_or_json(
        client: httpx.Client, path: str, request_kwargs: dict, says: str) -> None:
    """Issue 19: 65 photos were a 400 (the form parser's file limit) and 65 texts a 422."""
    assert says in error_message(client.post(path, **request_kwargs), 413, "too_many_inputs")


def test_body_over_the_limit_is_413_with_content_length(client: httpx.Client) -> None:
    big = b"\xff" * (MAX_BODY_BYTES + 1)
    response = client.post("/image", files={"image": ("big.jpg", big, "image/jpeg")})
    assert "262,144" in error_message(response, 413, "body_too_large")


def test_chunked_body_over_the_limit_is_413(client: httpx.Client) -> None:
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        yield (b'--b\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n'
               b"Content-Type: image/jpeg\r\n\r\n")
        for _ in range(8):
            sent += 64 * 1024
            yield b"\xff" * (64 * 1024)
        yield b"\r\n--b--\r\n"

    response = client.post("/image", content=chunks(), headers={"Content-Type": "multipart/form-data; boundary=b"})
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert "content-length" not in response.request.headers
    error_message(response, 413, "body_too_large")
    assert sent > MAX_BODY_BYTES
    assert client.get("/health").status_code == 200  # same connection, still serving


def test_unknown_route_and_wrong_method_are_json(client: httpx.Client) -> None:
    assert "/nowhere" in error_message(client.get("/nowhere"), 404, "not_found")
    error_message(client.get("/image"), 405, "method_not_allowed")


def test_the_server_survives_bad_input(client: httpx.Client) -> None:
    for _ in range(3):
        client.post("/image", files={"image": ("x.jpg", b"\x00" * 100, "image/jpeg")})
    assert client.post("/image", files={"image": RED}).status_code == 200


# ---- load and metrics ---------------------------------------------------------------------------
def test_concurrent_burst_has_no_errors_and_is_batched(server: LoopbackServer) -> None:
    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=20)
        async with httpx.AsyncClient(base_url=server.url, limits=limits, timeout=60) as http:
            gate = asyncio.Semaphore(20)

            async def one(i: int) -> httpx.Response:
                async with gate:
                    photo = RED if i % 3 else GREEN
                    if i % 4 == 0:
                        return await http.post("/image", files={"image": photo})
                    if i % 4 == 1:
                        return await http.post("/image/batch", files=[("image", RED), ("img", GREEN)])
                    if i % 4 == 2:
                        return await http.post("/text", json={"text": f"phone number {i}"})
                    return await http.post("/combined", files={"image": photo}, data={"text": "red dress"})

            return await asyncio.gather(*(one(i) for i in range(200)))

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses].count(200) == 200
    metrics = httpx.get(f"{server.url}/metrics").text
    count = _sample(metrics, 'marketplace_batch_size_count{model="image-classifier"}')
    total = _sample(metrics, 'marketplace_batch_size_sum{model="image-classifier"}')
    assert total >= 150  # 50 single photos + 50 batches of two
    assert count < total  # concurrent photos shared model calls
    assert _sample(metrics, 'marketplace_batch_size_sum{model="text-cnn"}') >= 50
    assert _sample(metrics, 'marketplace_batch_size_sum{model="fusion"}') >= 50


def _sample(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in the metrics")


def test_metrics_count_requests_by_route_and_status(client: httpx.Client) -> None:
    client.post("/image", files={"image": RED})
    client.post("/image", files={"image": ("x.jpg", b"junk", "image/jpeg")})
    client.get("/models/nope")
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    metrics = response.text
    assert _sample(metrics, 'marketplace_http_requests_total{method="POST",route="/image",status="200"}') >= 1
    assert _sample(metrics, 'marketplace_http_requests_total{method="POST",route="/image",status="400"}') >= 1
    models_404 = 'marketplace_http_requests_total{method="GET",route="/models/{name:path}",status="404"}'
    assert _sample(metrics, models_404) >= 1
    assert _sample(metrics, 'marketplace_http_request_duration_seconds_count{method="POST",route="/image"}') >= 2
    assert 'marketplace_inference_duration_seconds_bucket{le="0.01",model="image-classifier"}' in metrics


# ---- a model that cannot load -------------------------------------------------------------------
def test_a_model_that_fails_to_load_keeps_ready_503_and_says_why(checkpoints: Path) -> None:
    settings = ServingSettings(image_model=str(checkpoints / "missing"), text_model=str(checkpoints / "hog-svm"))
    with LoopbackServer(create_app(settings)) as running, httpx.Client(base_url=running.url) as http:
        deadline = time.monotonic() + 60
        while "loading" in (ready := http.get("/ready")).text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.status_code == 503
        statuses = ready.json()["models"]
        assert statuses[str(checkpoints / "missing")].startswith("failed: ")
        # hog-svm is an image model, so it cannot answer /text: refused at load time, with the reason.
        assert "input kind 'text'" in statuses[str(checkpoints / "hog-svm")]
        assert http.get("/health").status_code == 200
        error_message(http.post("/image", files={"image": RED}), 503, "model_not_ready")
        message = error_message(http.post("/combined", files={"image": RED}, data={"text": "a"}), 404, "unknown_model")
        assert "MARKETPLACE_COMBINED_MODEL" in message


def test_an_app_needs_a_model() -> None:
    with pytest.raises(ValueError, match="MARKETPLACE_IMAGE_MODEL"):
        create_app(ServingSettings(image_model=None, text_model=None, combined_model=None))


def test_a_listing_s_several_photos_count_together(client: httpx.Client, checkpoints: Path) -> None:
    both = client.post("/image", files=[("image", ("red.jpg", RED, "image/jpeg")),
                                        ("image", ("green.jpg", GREEN, "image/jpeg"))])
    assert both.status_code == 200, both.text
    expected = Predictor.from_pretrained(str(checkpoints / "image-classifier")).predict(image=[RED, GREEN])
    assert both.json()["probabilities"] == pytest.approx(expected.probabilities, abs=1e-5)
    alone = [client.post("/image", files={"image": photo}).json()["probabilities"] for photo in (RED, GREEN)]
    assert both.json()["probabilities"] == pytest.approx({name: (alone[0][name] + alone[1][name]) / 2
                                                          for name in alone[0]}, abs=1e-5)


def test_a_combined_listing_without_text_or_without_photo_gets_an_answer(client: httpx.Client,
                                                                         checkpoints: Path) -> None:
    fusion = Predictor.from_pretrained(str(checkpoints / "fusion"))
    photo_only = client.post("/combined", files={"image": ("red.jpg", RED, "image/jpeg")})
    assert photo_only.status_code == 200, photo_only.text
    assert "no text" in photo_only.json()["warning"]
    assert photo_only.json()["probabilities"] == pytest.approx(fusion.predict(image=RED).probabilities, abs=1e-5)
    for text_only in (client.post("/combined", data={"text": "red dress"}),
                      client.post("/combined", files={"text": (None, "red dress")})):
        assert text_only.status_code == 200, text_only.text
        assert "no photo" in text_only.json()["warning"] and text_only.json()["known_tokens"] == 1
    blank_text = client.post("/combined", files={"image": ("red.jpg", RED, "image/jpeg")}, data={"text": "  "})
    assert blank_text.status_code == 200 and "no text" in blank_text.json()["warning"]
