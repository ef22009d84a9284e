"""The scoring service (``serve.py``, ``service/``): every route and every refusal through FastAPI's TestClient,
its load limits with a blocked worker, the real server under concurrent traffic, and the web page in a real
headless browser (Debian's ``chromium`` driven by playwright; skipped, saying why, when there is none).

Scores are checked against ``infer.py``'s pipeline on the same files; the bad files are those of
``tests/test_hostile_inputs.py``.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

import infer
from core.images import ImageLoadError, load_image
from experts import create_expert, load_ensemble, read_manifest, save_ensemble, scores_fingerprint
from scoring.pipeline import score_images
from service.app import create_app
from service.scorer import Busy, Job, Scorer
from tests.conftest import ROOT
from tests.test_hostile_inputs import BAD_FILES, noise
from tests.test_startup import base_cache_file

DEMO = ROOT / "demo"
STATUS = {"empty.jpg": 400, "cut.jpg": 400, "cut.png": 400, "text.png": 415, "bomb.png": 413, "bomb2.png": 413,
          "photo.avif": 415, "photo.heic": 415}
UNUPLOADABLE = {"folder.jpg", "fifo.jpg"}  # a folder or a FIFO is not something a client can upload


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_ensemble({"eff": create_expert("test_efficientnet"), "eff2": create_expert("test_efficientnet")},
                         tmp_path_factory.mktemp("w") / "weights", weights={"eff": 1.0, "eff2": 3.0})


@pytest.fixture(scope="module")
def server_weights(tmp_path_factory) -> Path:
    """Tiny weights for the real server: two CLIP-family experts (plain torch: the server starts without timm)."""
    torch.manual_seed(1)
    return save_ensemble({"clip": create_expert("test_clip"), "clip2": create_expert("test_clip")},
                         tmp_path_factory.mktemp("w") / "weights")


@pytest.fixture(scope="module")
def ensemble(tiny_weights):
    torch.set_num_threads(1)
    return load_ensemble(tiny_weights)


@contextmanager
def client_for(weights: Path, ensemble=None, **options) -> Iterator[TestClient]:
    app = create_app(weights, ensemble=ensemble, threads=1, **options)
    with TestClient(app) as client:
        assert app.state.service.wait_ready(60), app.state.service.load_error
        yield client


@pytest.fixture
def client(tiny_weights, ensemble, tmp_path) -> Iterator[TestClient]:
    (tmp_path / "scratch").mkdir()
    with client_for(tiny_weights, ensemble, tmp_dir=tmp_path / "scratch") as c:
        yield c
    assert not list((tmp_path / "scratch").iterdir())


def post(client, data: bytes, name: str = "x.jpg", query: str = "", **kwargs) -> httpx.Response:
    return client.post(f"/v1/score{query}", files={"file": (name, data, "application/octet-stream")}, **kwargs)


# --------------------------------------------------------------------------------------------- routes
def test_health_describes_the_loaded_model(client, tiny_weights):
    r = client.get("/health")
    body = r.json()
    assert r.status_code == 200 and body["status"] == "ok"
    assert body["fingerprint"] == scores_fingerprint(read_manifest(tiny_weights))
    assert body["experts"] == ["eff", "eff2"] and body["threshold"] == 0.5 and body["model"]


def test_health_is_503_while_the_model_loads(tiny_weights, monkeypatch):
    import experts

    release = threading.Event()

    def slow_load(folder, device="cpu"):
        release.wait(30)
        return load_ensemble(folder, device)

    monkeypatch.setattr(experts, "load_ensemble", slow_load)
    app = create_app(tiny_weights, threads=1)
    with TestClient(app) as client:
        r = client.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading" and "Retry-After" in r.headers
        r = post(client, (DEMO / "dfdc_real_1.jpg").read_bytes())
        assert r.status_code == 503 and "loading" in r.json()["error"] and "Retry-After" in r.headers
        release.set()
        assert app.state.service.wait_ready(60)
        assert client.get("/health").status_code == 200


def test_score_gives_the_numbers_of_infer_py(client, ensemble, tiny_weights, tmp_path, capsys):
    """Same probabilities as infer.py's pipeline on the same files, to 1e-6, for several kinds of image."""
    Image.new("RGBA", (90, 40), (255, 0, 0, 80)).save(tmp_path / "alpha.png")
    Image.new("CMYK", (50, 70), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("RGB", (3000, 20), (9, 99, 199)).save(tmp_path / "strip.png")  # the aspect limit applies
    noise(200, 120, seed=3).save(tmp_path / "noise.webp", lossless=True)
    paths = [DEMO / "dfdc_fake_1.jpg", DEMO / "scene_real_1.jpg", *sorted(tmp_path.glob("*.*"))]
    expected = list(score_images(ensemble, [str(p) for p in paths], progress=False))
    for path, want in zip(paths, expected):
        r = post(client, path.read_bytes(), path.name)
        assert r.status_code == 200, r.text
        got = r.json()
        assert set(got) == {"prob", "verdict", "threshold", "experts"}
        assert abs(got["prob"] - want.prob) < 1e-6, path.name
        assert list(got["experts"]) == ["eff", "eff2"]
        assert np.allclose(list(got["experts"].values()), want.expert_probs, atol=1e-6, rtol=0)
        assert got["verdict"] == ensemble.verdict(want.prob) and got["threshold"] == ensemble.threshold
    # and as infer.py prints it
    assert infer.main([str(paths[0]), "--weights", str(tiny_weights), "--quiet", "--threads", "1"]) == 0
    prob, verdict, _ = capsys.readouterr().out.strip().split("\t")
    got = post(client, paths[0].read_bytes()).json()
    assert f"{got['prob']:.6f}" == prob and got["verdict"] == verdict


def test_the_page_is_served_with_no_external_url(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'type="file"' in r.text and 'id="verdict"' in r.text
    assert "http://" not in r.text and "https://" not in r.text and "//cdn" not in r.text


def test_heatmap_is_a_png_data_url_or_refused_as_missing(client, ensemble, tmp_path):
    data = (DEMO / "gan_fake_1.jpg").read_bytes()
    r = post(client, data, query="?heatmap=1")
    if not client.get("/health").json()["features"]["heatmap"]:
        assert r.status_code == 501 and "heatmaps.py" in r.json()["error"]
        pytest.skip("no heatmap module (scoring/heatmaps.py) in this installation")
    import base64
    import io

    assert r.status_code == 200, r.text
    body = r.json()
    assert body["heatmap"].startswith("data:image/png;base64,")
    assert body["prob"] == post(client, data).json()["prob"]  # the heatmap changes nothing in the score
    png = Image.open(io.BytesIO(base64.b64decode(body["heatmap"].split(",", 1)[1])))
    side = max(ensemble.input_sizes)
    assert png.format == "PNG" and png.size == (side, side)  # over the square the experts score
    Image.new("RGB", (60_000, 1), (200, 10, 10)).save(tmp_path / "strip.png")  # the aspect limit applies here too
    r = post(client, (tmp_path / "strip.png").read_bytes(), "strip.png", query="?heatmap=1")
    assert r.status_code == 200 and r.json()["heatmap"].startswith("data:image/png;base64,")
    assert "heatmap" not in post(client, data, query="?heatmap=0").json()


def test_a_video_is_scored_as_infer_py_scores_it(client, ensemble, tmp_path):
    if not client.get("/health").json()["features"]["video"]:
        r = post(client, b"\0" * 64, "clip.mp4")
        assert r.status_code == 415 and "video.py is missing" in r.json()["error"]
        pytest.skip("no video module (scoring/video.py) in this installation")
    from scoring.video import score_video
    from tests.test_video import moving_frames, write_video

    path = write_video(tmp_path / "clip.mp4", moving_frames(20))
    want = score_video(ensemble, path, frames=16)
    r = post(client, path.read_bytes(), "my clip.mp4")
    assert r.status_code == 200, r.text
    got = r.json()
    assert abs(got["prob"] - want.prob) < 1e-6 and got["verdict"] == ensemble.verdict(want.prob)
    assert np.allclose(list(got["experts"].values()), want.expert_probs, atol=1e-6, rtol=0)
    assert got["agg"] == "mean" and [f["index"] for f in got["frames"]] == want.frame_indices.tolist()
    assert np.allclose([f["prob"] for f in got["frames"]], want.frame_probs, atol=1e-6, rtol=0)
    for name, data, status, reason in [("noise.mp4", np.random.default_rng(0).bytes(4096), 415, "not a video file"),
                                       ("empty.mov", b"", 400, "the file is empty"),
                                       ("cut.mp4", path.read_bytes()[:3000], 415, "truncated or corrupt")]:
        r = post(client, data, name)
        assert r.status_code == status and r.json()["error"].startswith(f"{name}: ") and reason in r.json()["error"]
    # the client fixture checks that no scratch file is left


# ------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("name", sorted(set(BAD_FILES) - UNUPLOADABLE))
def test_bad_file_is_refused_as_infer_py_refuses_it(client, tmp_path, name):
    make, reason = BAD_FILES[name]
    path = tmp_path / name
    make(path)
    with pytest.raises(ImageLoadError) as info:
        load_image(path)
    r = post(client, path.read_bytes(), name)
    assert r.status_code == STATUS[name], r.text
    assert r.json() == {"error": f"{name}: {info.value.reason}"}  # the message infer.py prints, for the upload's name


@pytest.mark.parametrize("request_kwargs, status, message", [
    ({"files": {"other": ("x.jpg", b"abc")}}, 422, "missing multipart field 'file'"),
    ({"data": {"file": "not a file"}}, 415, "multipart/form-data"),  # urlencoded form
    ({"content": b"\x89PNG...", "headers": {"content-type": "image/png"}}, 415, "multipart/form-data"),
    ({"content": b"--xyz\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc",
      "headers": {"content-type": "multipart/form-data; boundary=xyz"}}, 400, "ends before its closing boundary"),
    ({"content": b"garbage", "headers": {"content-type": "multipart/form-data; boundary=xyz"}}, 400, "malformed"),
    ({"content": b"", "headers": {"content-type": "multipart/form-data"}}, 400, "no boundary"),
])
def test_malformed_requests_are_4xx_json(client, request_kwargs, status, message):
    r = client.post("/v1/score", **request_kwargs)
    assert r.status_code == status and message in r.json()["error"]


def test_other_errors_are_json_too(client):
    assert client.get("/nope").json() == {"error": "Not Found"}
    r = client.get("/v1/score")
    assert r.status_code == 405 and "error" in r.json()
    r = post(client, b"abc", query="?heatmap=perhaps")
    assert r.status_code == 422 and "heatmap" in r.json()["error"]


def asgi_post(client: TestClient, chunks: Iterator[bytes], headers: dict[str, str]) -> tuple[int, bytes, int]:
    """POST the body ``chunks`` one ASGI message each, as a server streams them (TestClient would join them
    first); returns the status, the body and how many chunks the app asked for."""
    pulled = 0

    async def receive() -> dict:
        nonlocal pulled
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += 1
        return {"type": "http.request", "body": chunk, "more_body": True}

    messages = []

    async def send(message: dict) -> None:
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/score", "raw_path": b"/v1/score", "query_string": b"", "root_path": "",
             "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {}}

    async def call() -> None:
        await client.app(scope, receive, send)

    client.portal.call(call)
    status = next(m["status"] for m in messages if m["type"] == "http.response.start")
    return status, b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body"), pulled


def test_too_many_bytes_is_refused_while_streaming(tiny_weights, ensemble):
    def body(chunks: int, size: int = 4096) -> Iterator[bytes]:
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jpg\"\r\n\r\n"
        for _ in range(chunks):
            yield b"\xff" * size
        yield b"\r\n--b--\r\n"

    with client_for(tiny_weights, ensemble, max_bytes=20_000) as client:
        headers = {"content-type": "multipart/form-data; boundary=b"}
        status, answer, pulled = asgi_post(client, body(1000), headers)
        assert status == 413 and b"file too large (more than 20,000 bytes" in answer
        assert pulled < 10  # refused once 20 kB arrived, long before the 4 MB were sent
        status, answer, pulled = asgi_post(client, body(1000), {**headers, "content-length": str(4_096_100)})
        assert status == 413 and b"upload too large (3.9 MiB; the limit is 20,000 bytes)" in answer
        assert pulled == 0  # the declared length alone refused it
        r = client.post("/v1/score", content=b"".join(body(1000)), headers=headers)  # through the HTTP client too
        assert r.status_code == 413 and "too large" in r.json()["error"]
        # at the limit itself, the file is read (and here refused as what it is: not an image)
        r = post(client, b"\0" * 20_000, "edge.jpg")
        assert r.status_code == 415 and "edge.jpg: not an image file" in r.json()["error"]


def test_a_full_queue_is_refused_at_once_and_a_late_answer_is_504(tiny_weights, tmp_path):
    ensemble = load_ensemble(tiny_weights)
    started, release = threading.Event(), threading.Event()
    real = ensemble.expert_probs

    def blocked(images):
        started.set()
        assert release.wait(30)
        return real(images)

    ensemble.expert_probs = blocked
    data = (DEMO / "dfdc_real_1.jpg").read_bytes()
    with client_for(tiny_weights, ensemble, workers=1, batch_size=1, queue=1, timeout=20) as client:
        service = client.app.state.service
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(post, client, data)  # runs, blocked in the model
            assert started.wait(20)
            second = pool.submit(post, client, data)  # waits in the queue
            deadline = time.monotonic() + 20
            while service.scorer.queue.qsize() < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            start = time.perf_counter()
            third = post(client, data)
            assert time.perf_counter() - start < 2.0
            assert third.status_code == 503 and third.headers["Retry-After"] == "1" and "busy" in third.json()["error"]
            release.set()
            assert first.result().status_code == 200 and second.result().status_code == 200
        assert post(client, data).status_code == 200  # and the service goes on
    started.clear()
    release.clear()
    with client_for(tiny_weights, ensemble, workers=1, batch_size=1, queue=2, timeout=0.5) as client:
        start = time.perf_counter()
        r = post(client, data)
        assert r.status_code == 504 and "time limit (0.5 s)" in r.json()["error"]
        assert time.perf_counter() - start < 5
        release.set()
        assert post(client, data).status_code == 200


def test_the_scorer_queue_bound_and_batching(ensemble):
    scorer = Scorer(ensemble, workers=1, queue_size=2, batch_size=4)  # not started: nothing takes jobs
    data = (DEMO / "gan_real_1.jpg").read_bytes()
    queued = [scorer.submit(Job(data, "a.jpg")), scorer.submit(Job(data, "b.jpg"))]
    with pytest.raises(Busy):
        scorer.submit(Job(data, "c.jpg"))
    calls = []
    real = ensemble.expert_probs
    ensemble.expert_probs = lambda images: calls.append(len(next(iter(images.values())))) or real(images)
    try:
        scorer.start()  # the worker takes both queued jobs into one forward pass
        assert [f.result(timeout=30)["prob"] for f in queued][0] >= 0
        assert calls == [2]
        later = scorer.submit(Job(data, "d.jpg"))
        assert later.result(timeout=30)["prob"] == queued[0].result()["prob"]
        scorer.stop()
    finally:
        del ensemble.expert_probs
    assert calls == [2, 1]


def test_no_temporary_file_is_left(client, tmp_path):
    """Images are read in memory; nothing is written to the temporary folder (videos: a scratch file, removed)."""
    before = set(Path(tempfile.gettempdir()).glob("deepfake-upload-*"))
    for name in ("empty.jpg", "cut.png", "bomb.png"):
        BAD_FILES[name][0](tmp_path / name)
        post(client, (tmp_path / name).read_bytes(), name)
    post(client, (DEMO / "gan_real_1.jpg").read_bytes())
    client.post("/v1/score", content=b"--b\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc",
                headers={"content-type": "multipart/form-data; boundary=b"})
    if client.get("/health").json()["features"]["video"]:
        post(client, b"not really a video", "clip.mp4")
    assert set(Path(tempfile.gettempdir()).glob("deepfake-upload-*")) == before
    # the client fixture checks that its scratch folder is empty afterwards


# ------------------------------------------------------------------------------------- the real server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def real_server(weights: Path, *extra: str, stop: signal.Signals = signal.SIGINT) -> Iterator[str]:
    """``python serve.py`` on a free loopback port until the block ends; then stopped with ``stop``, which must
    end it cleanly (status 0)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--port", str(port), "--weights", str(weights),
                             "--threads", "1", "--quiet", *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(stop)
        try:
            output = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate()[0]
            pytest.fail(f"the server did not stop on {stop.name}:\n{output[-3000:]}")
    assert proc.returncode == 0 and "Traceback" not in output, output[-3000:]
    assert f"stopped by {stop.name}" in output


def test_the_real_server_under_concurrent_traffic(server_weights):
    files = [DEMO / n for n in ("dfdc_fake_1.jpg", "dfdc_real_1.jpg", "gan_fake_1.jpg", "scene_real_1.jpg")]
    payloads = {f.name: f.read_bytes() for f in files}
    with real_server(server_weights, "--workers", "2") as url, httpx.Client(base_url=url, timeout=60) as http:
        def one(i: int) -> tuple[str, int, dict]:
            name = files[i % len(files)].name
            r = http.post("/v1/score", files={"file": (name, payloads[name], "image/jpeg")})
            return name, r.status_code, r.json()

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(one, range(40)))
        assert http.get("/health").json()["limits"]["workers"] == 2
    assert [status for _, status, _ in results] == [200] * 40
    by_file: dict[str, list[dict]] = {}
    for name, _, body in results:
        by_file.setdefault(name, []).append(body)
    for name, bodies in by_file.items():  # identical files, identical answers, however they were batched
        assert all(abs(b["prob"] - bodies[0]["prob"]) < 1e-6 and b["verdict"] == bodies[0]["verdict"]
                   for b in bodies), name


# ----------------------------------------------------------------------------------------- the web page
def test_the_page_in_a_real_browser(server_weights, tmp_path, capsys):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.skip("no chromium binary on PATH (apt-get install chromium); the web page was not tested in a browser")
    from playwright.sync_api import sync_playwright

    shipped = base_cache_file().is_file()
    weights = ROOT / "weights" if shipped else server_weights
    image = DEMO / "dfdc_fake_1.jpg"
    with real_server(weights, stop=signal.SIGTERM) as url:
        assert infer.main([str(image), "--weights", str(weights), "--quiet", "--threads", "1"]) == 0
        expected = capsys.readouterr().out.strip().split("\t")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 760})
                page.goto(url + "/")
                page.wait_for_function("document.getElementById('model').textContent.startsWith('model ')")
                page.set_input_files("#file", str(image))
                page.wait_for_selector("body[data-state=done], body[data-state=error]", timeout=120_000)
                assert page.get_attribute("body", "data-state") == "done", page.text_content("#error")
                assert page.text_content("#verdict") == expected[1]
                assert expected[0] in page.text_content("#prob")  # the probability, as infer.py prints it
                assert page.locator(".expert").count() == len(read_manifest(weights)["experts"])
                if page.is_visible("#heatctl"):
                    page.wait_for_function("document.getElementById('heat').style.display === 'block'")
                page.screenshot(path=str(tmp_path / "screenshot.png"), full_page=True)
            finally:
                browser.close()
    if shipped:
        assert expected[1] == "fake"
        (ROOT / "runs" / "service").mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "screenshot.png", ROOT / "runs" / "service" / "screenshot.png")


def test_the_readme_serve_commands_use_options_serve_py_has():
    """tests/test_readme.py checks commands of scripts in folders (and infer.py); this checks serve.py's."""
    import re
    import shlex

    import serve

    known = set(serve.build_parser()._option_string_actions)
    lines = [line.split("  #")[0] for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
             for line in block.splitlines() if line.startswith("python serve.py")]
    assert lines, "the README shows no python serve.py command"
    for line in lines:
        options = [t.split("=")[0] for t in shlex.split(line) if t.startswith("--")]
        assert set(options) <= known, line
