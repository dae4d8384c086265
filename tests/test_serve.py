"""`flaxvision serve` as a real process on 127.0.0.1, hit by a real HTTP client (httpx).

One server process for the module (a tiny ViT saved with save_pretrained, buckets 1,2,4,8). The SIGTERM test
stops that same process, so it is the LAST test of this file (pytest runs a file's tests in order; the suite
distributes whole files).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import CLASS_NAMES, cli_env, run_cli, tiny_vit

BUCKETS = [1, 2, 4, 8]
SERVER_FLAGS = ["--max-batch", "8", "--max-wait-ms", "50", "--max-request-mb", "1", "--max-image-pixels", "1000000",
                "--max-images", "8"]  # fmt: skip


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, model_dir: Path, images: list[Path], stderr: Path, want: dict):
        self.proc, self.url, self.model_dir, self.images, self.stderr = proc, url, model_dir, images, stderr
        self.want = want  # predict --json on `images`, by file name
        self.http = httpx.Client(timeout=60)  # one client (keep-alive) for the main thread's requests

    def health(self) -> dict:
        r = self.http.get(f"{self.url}/health")
        assert r.status_code == 200, r.text
        return r.json()

    def post(self, **kw) -> httpx.Response:
        return self.http.post(f"{self.url}/predict", **kw)


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from flaxvision.weights import save_pretrained

    root = tmp_path_factory.mktemp("serve")
    model = tiny_vit()
    model.label_names = tuple(CLASS_NAMES)
    save_pretrained(model, root / "model")
    rng = np.random.default_rng(0)
    images = []
    for i, (h, w) in enumerate([(40, 50), (16, 16), (33, 20), (64, 48)]):
        path = root / (f"img{i}.png" if i % 2 == 0 else f"img{i}.jpg")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        images.append(path)
    stderr = root / "server.stderr"
    with open(stderr, "w") as err_file:
        proc = subprocess.Popen([sys.executable, "-m", "flaxvision", "serve", str(root / "model"), "--port", "0",
                                 *SERVER_FLAGS], stdout=subprocess.PIPE, stderr=err_file, text=True, env=cli_env(),
                                start_new_session=True)  # fmt: skip
    lines: list[str] = []
    ready = threading.Event()

    def drain() -> None:  # keeps reading stdout so the server never blocks on a full pipe
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "serving" in line:
                ready.set()
        ready.set()

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    want = _predict_json(root / "model", images)  # while the server starts
    ready.wait(180)
    line = next((x for x in lines if x.startswith("flaxvision: serving")), None)
    if line is None:
        proc.kill()
        pytest.fail(f"no ready line; stdout {lines}, stderr {stderr.read_text()[-2000:]}")
    assert f"(buckets {','.join(map(str, BUCKETS))}; POST /predict, GET /health, GET /metadata)" in line
    url = line.split(" on ", 1)[1].split(" ", 1)[0]
    assert url.startswith("http://127.0.0.1:") and not url.endswith(":0")
    served = Server(proc, url, root / "model", images, stderr, want)
    yield served
    served.http.close()
    if proc.poll() is None:
        proc.terminate()
        proc.wait(60)
    drainer.join(10)
    assert proc.stdout is not None
    proc.stdout.close()


@pytest.fixture(scope="module")
def want(server) -> dict[str, list[dict]]:
    return server.want


def _predict_json(model_dir: Path, images: list[Path]) -> dict[str, list[dict]]:
    """predict --json on the same files (in this process, through flaxvision.cli.main), by file name."""
    from flaxvision.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["predict", str(model_dir), *map(str, images), "--json"]) == 0
    return {Path(row["path"]).name: row["predictions"] for row in json.loads(out.getvalue())}


def _same(got: list[dict], want: list[dict]) -> None:
    assert [p["label"] for p in got] == [p["label"] for p in want]
    np.testing.assert_allclose([p["probability"] for p in got], [p["probability"] for p in want], atol=1e-5)


def test_predict_answers_as_predict_json(server, want):
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in server.images]
    r = server.post(files=files)
    assert r.status_code == 200, r.text
    rows = r.json()
    assert [row["path"] for row in rows] == [p.name for p in server.images]  # the parts' order
    for row in rows:
        assert set(row) == {"path", "predictions"} and len(row["predictions"]) == len(CLASS_NAMES)
        _same(row["predictions"], want[row["path"]])
    raw = server.post(content=server.images[2].read_bytes(), headers={"content-type": "application/octet-stream"},
                      params={"top_k": "2"})  # fmt: skip
    assert raw.status_code == 200, raw.text
    [row] = raw.json()
    assert row["path"] == "image"
    _same(row["predictions"], want[server.images[2].name][:2])
    # Parts with an empty filename are named by their position (httpx leaves out an empty filename: built by hand).
    body = b"".join(b'--b\r\nContent-Disposition: form-data; name="f"; filename=""\r\n\r\n' + p.read_bytes() + b"\r\n"
                    for p in server.images[:2]) + b"--b--\r\n"  # fmt: skip
    unnamed = server.post(content=body, headers={"content-type": "multipart/form-data; boundary=b"})
    assert [row["path"] for row in unnamed.json()] == ["image-1", "image-2"], unnamed.text
    _same(unnamed.json()[1]["predictions"], want[server.images[1].name])


def test_health_and_metadata(server):
    health = server.health()
    assert health["status"] == "ok" and health["buckets"] == BUCKETS
    meta = server.http.get(f"{server.url}/metadata").json()
    assert meta["labels"] == CLASS_NAMES and meta["input"]["shape"] == [None, 16, 16, 3]
    assert meta["input"]["baked"] == ["normalize"] and meta["preprocessing"]["img_size"] == 16
    assert meta["server"]["buckets"] == BUCKETS and meta["server"]["max_images"] == 8
    assert meta["server"]["max_request_bytes"] == 1024 * 1024 and meta["server"]["max_image_pixels"] == 1_000_000


def test_sixteen_concurrent_clients_are_batched_over_the_compiled_buckets(server, want):
    before = server.health()
    barrier = threading.Barrier(16)
    answers: dict[int, list] = {}

    def client(i: int) -> None:
        image = server.images[i % len(server.images)]
        with httpx.Client(timeout=60) as http:
            barrier.wait()
            answers[i] = [http.post(f"{server.url}/predict", content=image.read_bytes(),
                                    headers={"content-type": "image/png"}) for _ in range(3)]  # fmt: skip

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(answers) == list(range(16))
    for i, responses in answers.items():
        for r in responses:
            assert r.status_code == 200, r.text
            _same(r.json()[0]["predictions"], want[server.images[i % len(server.images)].name])
    after = server.health()
    assert after["images"] - before["images"] == 48
    # 48 one-image requests in fewer than 48 batches: images of different requests shared a batch.
    assert after["batches"] - before["batches"] < 48 and after["max_batch_seen"] > 1
    # Requests of 1, 2, 3, 4 images and batches of many sizes, and still one compiled program per bucket.
    assert after["compiled_shapes"] == len(BUCKETS)


def _jpeg() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(out, format="JPEG")
    return out.getvalue()


def _stream(data: bytes):
    yield data[: len(data) // 2]
    yield data[len(data) // 2 :]


def _raw(body, content_type: str | None = "image/png", **kw) -> dict:
    """httpx keywords for a raw body of `content_type` (None: no Content-Type header)."""
    return dict(content=body, headers={"content-type": content_type} if content_type else {}, **kw)


MB_AND_A_HALF = b"\0" * (1536 * 1024)  # over the server's --max-request-mb 1
PART_HEAD = b'--b\r\nContent-Disposition: form-data; name="f"; filename="big.png"\r\n\r\n'
MULTIPART_B = "multipart/form-data; boundary=b"
TINY_PNG = _png(np.zeros((8, 8, 3), np.uint8))

BAD = [  # (what, request keywords, status, a word of the message)
    ("not an image", _raw(b"not an image at all"), 422, "not a readable image"),
    ("not an image, multipart", dict(files=[("f", ("notes.png", b"\x89PNG broken"))]), 422, "notes.png"),
    ("truncated JPEG", _raw(_jpeg()[: len(_jpeg()) // 2], "image/jpeg"), 422, "truncated"),
    ("empty body", _raw(b"", "image/jpeg"), 400, "empty"),
    ("empty file", dict(files=[("f", ("zero.png", b""))]), 400, "zero.png: empty"),
    ("no file part", _raw(b"--b--\r\n", MULTIPART_B), 400, "without any file"),
    ("form, not multipart", dict(data={"note": "hello"}), 415, "application/x-www-form-urlencoded"),
    ("text field", dict(data={"note": "hi"}, files=[("f", ("a.png", TINY_PNG))]), 422, "'note' is not a file"),
    ("request too large", _raw(MB_AND_A_HALF), 413, "--max-request-mb"),
    ("too large, no length", _raw(_stream(MB_AND_A_HALF)), 413, "--max-request-mb"),
    ("too large multipart, no length", _raw(_stream(PART_HEAD + MB_AND_A_HALF), MULTIPART_B), 413, "--max-request-mb"),
    ("too many pixels", _raw(_png(np.zeros((1000, 1001, 3), np.uint8))), 413, "--max-image-pixels"),
    ("too many images", dict(files=[("f", (f"{i}.png", TINY_PNG)) for i in range(9)]), 413, "--max-images"),
    ("wrong content type", _raw(b"{}", "application/json"), 415, "application/json"),
    ("no content type", _raw(b"abc", None), 415, "(none)"),
    ("malformed multipart", _raw(b"xx", "multipart/form-data"), 400, "multipart"),
    ("top_k 0", _raw(b"x", params={"top_k": "0"}), 422, "top_k"),
    ("top_k not a number", _raw(b"x", params={"top_k": "three"}), 422, "top_k"),
    ("unknown parameter", _raw(b"x", params={"topk": "3"}), 422, "'topk'"),
]


def test_every_bad_input_is_one_json_4xx_and_the_server_stays_healthy(server):
    images_before = server.health()["images"]
    for what, kw, status, word in BAD:
        r = server.post(**kw)
        assert r.status_code == status, (what, r.status_code, r.text)
        body = r.json()
        assert set(body) == {"error"} and word in body["error"], (what, body)
        assert "\n" not in body["error"] and "Traceback" not in body["error"], what
    # All or nothing: one bad file in a request of good ones fails the request, naming it; nothing is predicted.
    good = server.images[0].read_bytes()
    mixed = server.post(files=[("f", ("good.png", good)), ("f", ("bad.png", b"garbage")), ("f", ("ok.png", good))])
    assert mixed.status_code == 422 and mixed.json()["error"].startswith("bad.png: not a readable image")
    for method, path, status in [("GET", "/nope", 404), ("POST", "/health", 405), ("GET", "/predict", 405)]:
        r = server.http.request(method, f"{server.url}{path}")
        assert r.status_code == status and set(r.json()) == {"error"} and "POST /predict" in r.json()["error"]
    health = server.health()
    assert health["status"] == "ok" and health["images"] == images_before
    assert health["errors"] >= len(BAD) + 4
    ok = server.post(content=good, headers={"content-type": "image/png"})
    assert ok.status_code == 200 and ok.json()[0]["path"] == "image"
    assert server.proc.poll() is None and "Traceback" not in server.stderr.read_text()


def test_port_in_use_bad_flags_and_missing_extra_are_one_line_before_loading(server, capsys, monkeypatch):
    port = server.url.rsplit(":", 1)[1]
    code, _, err = run_cli(["serve", "no/such-model-anywhere", "--port", port], capsys)
    assert code == 2 and f"port {port} on 127.0.0.1 is already in use" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(["serve", str(server.model_dir), "--max-batch", "0"], capsys)
    assert code == 2 and "--max-batch must be in 1..1024, got 0" in err
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if the [serve] extra were not installed
    code, _, err = run_cli(["serve", str(server.model_dir), "--port", "0"], capsys)
    assert code == 2 and "uvicorn is missing" in err and "pip install 'flaxvision[serve]'" in err


def test_a_failing_batch_is_one_500_logged_once_and_the_server_goes_on(caplog, monkeypatch):
    """Fault injection, in process (starlette's TestClient over the same app): the device program raises once."""
    from fastapi.testclient import TestClient

    from flaxvision.ship.server import ServeSettings, Service, create_app

    model = tiny_vit()
    model.label_names = tuple(CLASS_NAMES)
    service = Service(model, ServeSettings(max_batch=2, max_wait_ms=0), source="tiny")
    program = service.batcher._program

    def broken(images):
        raise RuntimeError("device lost")

    image = _png(np.full((20, 20, 3), 200, np.uint8))
    with TestClient(create_app(service)) as http:
        monkeypatch.setattr(service.batcher, "_program", broken)
        r = http.post("/predict", content=image, headers={"content-type": "image/png"})
        assert r.status_code == 500
        want = "internal server error (the device batch failed: RuntimeError); see the server's log"
        assert r.json() == {"error": want}
        monkeypatch.setattr(service.batcher, "_program", program)
        ok = http.post("/predict", files=[("f", ("a.png", image)), ("f", ("b.png", image))])
        assert ok.status_code == 200 and [row["path"] for row in ok.json()] == ["a.png", "b.png"]
        assert http.get("/health").json()["errors"] == 1
    logged = [record for record in caplog.records if record.exc_info]
    assert len(logged) == 1 and "device lost" in str(logged[0].exc_info[1])  # type: ignore[index]


def test_sigterm_finishes_requests_in_flight_then_exits_0(server, want):
    """LAST in this file: it stops the module's server. Three requests are in flight (their bodies half sent) when
    SIGTERM arrives: the server stops accepting connections, answers the three, and exits with 0."""
    release = threading.Event()
    answers: dict[int, httpx.Response] = {}

    def slow_body(data: bytes):
        yield data[:100]
        release.wait(60)
        yield data[100:]

    def client(i: int) -> None:
        with httpx.Client(timeout=60) as http:
            answers[i] = http.post(f"{server.url}/predict", **_raw(slow_body(server.images[i].read_bytes())))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while server.health()["in_flight"] < 3:
        assert time.monotonic() < deadline, "the three slow requests never reached the server"
        time.sleep(0.05)
    os.kill(server.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while True:  # new connections are refused while the three are still open
        try:
            httpx.get(f"{server.url}/health", timeout=2)
        except httpx.TransportError:
            break
        assert time.monotonic() < deadline, "the server still accepts connections after SIGTERM"
        time.sleep(0.05)
    assert server.proc.poll() is None
    release.set()
    for t in threads:
        t.join(60)
    for i in range(3):
        assert answers[i].status_code == 200, answers[i].text
        _same(answers[i].json()[0]["predictions"], want[server.images[i].name])
    assert server.proc.wait(60) == 0
    assert "flaxvision: server stopped" in server.stderr.read_text()
