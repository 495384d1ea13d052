"""`jaxtag serve`'s HTTP API: every endpoint gives the Python API's numbers for the same file,
every refusal is a 4xx with a one-line JSON error naming only the client's file, requests that
arrive together share model calls, and 32 concurrent requests each get their own answer."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

import jaxtag
from jaxtag import audio, cli
from jaxtag.server.app import create_app, serving_in_background
from jaxtag.serving import Limits, Service, upload_name
from tests.data_fixtures import write_audio, write_corrupt
from tests.serve_process import jaxtag_serve, stopped
from tests.tag_fixtures import TAGS, make_checkpoint, write_library

REPO = Path(__file__).resolve().parents[1]
LENGTHS = [12.0, 40.0, 3.0, 7.5]  # protocol clips, a long track (adjacent windows)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("serve_ckpt") / "ckpt")


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> list[str]:
    return write_library(tmp_path_factory.mktemp("serve_library"), LENGTHS)


@pytest.fixture(scope="module")
def tagger(checkpoint) -> jaxtag.Tagger:
    return jaxtag.load(checkpoint, batch_size=8)


@pytest.fixture(scope="module")
def service(tagger):
    service = Service(tagger, Limits(max_upload_bytes=4 * 2**20, max_seconds=60.0))
    yield service
    service.close()


@pytest.fixture(scope="module")
def client(service) -> TestClient:
    return TestClient(create_app(service))


def upload(path: str, name: str | None = None) -> dict:
    with open(path, "rb") as f:
        return {"audio": (name or os.path.basename(path), f.read())}


def error_of(response) -> str:
    body = response.json()
    assert set(body) == {"error"}, body
    assert "\n" not in body["error"]
    return body["error"]


def test_health_names_the_model_its_tags_and_engine(client, tagger):
    health = client.get("/api/health").json()
    assert health["model"] == "ckpt" and health["tags"] == TAGS
    assert health["engine"] == tagger.engine and health["layers"] == tagger.layers
    assert health["limits"] == {"max_upload_bytes": 4 * 2**20, "max_seconds": 60.0}


def test_the_schema_lists_every_endpoint(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    assert set(paths) == {"/api/health", "/api/tag", "/api/taggram", "/api/embed", "/api/explain"}
    body = paths["/api/tag"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    form = schema["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]]
    assert form["required"] == ["audio"] and "audio" in form["properties"]


def test_tag_is_the_python_api(client, tagger, library):
    for path in library:
        answer = client.post("/api/tag?top_k=3", files=upload(path)).json()
        expected = tagger.predict(path)
        got = np.array([answer["probabilities"][t] for t in TAGS])
        np.testing.assert_allclose(got, expected, atol=1e-6)
        assert [t["label"] for t in answer["tags"]] == [t["label"] for t in tagger.tag(path, 3)]
        np.testing.assert_allclose(
            [t["score"] for t in answer["tags"]], np.sort(expected)[::-1][:3], atol=1e-6
        )
        assert answer["duration"] == pytest.approx(
            audio.load_audio(path).size / audio.SAMPLE_RATE, abs=1e-3
        )


def test_taggram_is_the_python_api(client, tagger, library):
    answer = client.post("/api/taggram", files=upload(library[1])).json()
    starts, probs = tagger.taggram(library[1])
    np.testing.assert_allclose(answer["starts"], starts, atol=1e-9)
    np.testing.assert_allclose(answer["taggram"], probs, atol=1e-6)
    assert answer["labels"] == TAGS and len(starts) == 10  # 40 s in ~4.1 s windows
    np.testing.assert_allclose(
        [answer["probabilities"][t] for t in TAGS], tagger.predict(library[1]), atol=1e-6
    )


@pytest.mark.parametrize("layer", ["pooled", "layer_0", "front_end"])
def test_embed_is_the_python_api(client, tagger, library, layer):
    answer = client.post(f"/api/embed?layer={layer}", files=upload(library[0])).json()
    assert answer["layer"] == layer
    np.testing.assert_allclose(answer["embedding"], tagger.embed(library[0], layer), atol=1e-6)


def test_explain_is_the_python_api(client, tagger, library):
    answer = client.post("/api/explain?start=2.5&tags=drums,piano", files=upload(library[1])).json()
    explained = tagger.explain(library[1], start=2.5, tags=["drums", "piano"])
    assert answer["chosen"] == ["drums", "piano"] and answer["start"] == explained.start
    for key in ("first_layer_received", "last_layer_cls_heads", "last_layer_cls_mean"):
        np.testing.assert_allclose(answer[key], explained.maps[key], atol=1e-5)
    np.testing.assert_allclose(
        np.array([answer["contributions"][t] for t in explained.chosen]).T,
        explained.contributions,
        atol=1e-5,
    )
    np.testing.assert_allclose(answer["times"], explained.times, atol=1e-9)


def test_explain_png_is_the_figure_of_jaxtag_explain(client, tagger, library, tmp_path):
    import matplotlib.image

    response = client.post("/api/explain?start=1&format=png", files=upload(library[0]))
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["x-chunk-start"] == f"{tagger.explain(library[0], start=1).start:.3f}"
    served = matplotlib.image.imread(io.BytesIO(response.content))
    drawn = matplotlib.image.imread(tagger.explain(library[0], start=1).plot(tmp_path / "f.png"))
    assert served.shape == drawn.shape  # same figure, same size (its title names the upload)


def test_the_page_and_its_files_come_from_jaxtag(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for asset in ("/static/app.js", "/static/style.css"):
        assert f'"{asset}"' in page.text and client.get(asset).status_code == 200
    everything = (
        page.text + client.get("/static/app.js").text + client.get("/static/style.css").text
    )
    assert "http://" not in everything and "https://" not in everything  # no CDN


# ----------------------------------------------------------------------------------------------
# Refusals


def test_an_upload_over_the_limit_is_413_before_it_is_read(client, library):
    big = {"audio": ("big.wav", b"\0" * (4 * 2**20 + 1))}
    response = client.post("/api/tag", files=big)
    assert response.status_code == 413 and "4 MB" in error_of(response)


def test_a_streamed_upload_over_the_limit_is_413(client):
    def chunks():  # no Content-Length: chunked transfer
        yield b'--b\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"\r\n\r\n'
        for _ in range(5):
            yield b"\0" * 2**20
        yield b"\r\n--b--\r\n"

    response = client.post(
        "/api/tag", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code == 413 and "larger than this server takes" in error_of(response)


def test_audio_longer_than_the_limit_is_413(tmp_path, tagger):
    service = Service(tagger, Limits(max_seconds=10.0))
    long = write_audio(str(tmp_path / "long.flac"), 12.0, sr=22_050)
    response = TestClient(create_app(service)).post("/api/tag", files=upload(long))
    service.close()
    assert response.status_code == 413
    assert error_of(response) == "long.flac: 12 s of audio, more than this server takes (10 s)"


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("notes.wav", b"just some text", "notes.wav: cannot decode audio"),
        ("broken.mp3", None, "broken.mp3: cannot decode audio"),
        ("tiny.wav", "short", "tiny.wav: only 0.51 s of audio (clips under 1 s are skipped)"),
    ],
)
def test_audio_that_cannot_be_used_is_422_naming_only_the_clients_file(
    client, tmp_path, name, content, expected
):
    if content is None:
        path = write_corrupt(str(tmp_path / name))
    elif content == "short":
        path = write_audio(str(tmp_path / name), 0.5)
    else:
        path = tmp_path / name
        path.write_bytes(content)
    response = client.post("/api/tag", files=upload(str(path)))
    message = error_of(response)
    assert response.status_code == 422 and message.startswith(expected), message
    assert "jaxtag-upload" not in message and str(tmp_path) not in message


@pytest.mark.parametrize(
    "url, expected",
    [
        ("/api/explain?tags=drums,trumpet", "unknown tags ['trumpet']"),
        ("/api/explain?start=99", "a.wav: start 99.01 s is past the last chunk start (7.92 s)"),
        ("/api/embed?layer=layer_7", "layer 'layer_7': this model has front_end, layer_0"),
    ],
)
def test_what_the_model_cannot_answer_is_422(client, library, url, expected):
    response = client.post(url, files=upload(library[0], "a.wav"))
    assert response.status_code == 422 and error_of(response).startswith(expected)


@pytest.mark.parametrize(
    "url, files, expected",
    [
        ("/api/tag?top_k=0", True, "top_k: Input should be greater than or equal to 1"),
        ("/api/explain?start=-1", True, "start: Input should be greater than or equal to 0"),
        ("/api/explain?start=nan", True, "start: Input should be a finite number"),
        ("/api/explain?format=gif", True, "format: String should match pattern"),
        ("/api/tag", False, "audio: Field required"),
    ],
)
def test_malformed_requests_are_400(client, library, url, files, expected):
    response = client.post(url, files=upload(library[0]) if files else None)
    assert response.status_code == 400 and error_of(response).startswith(expected)


def test_a_request_never_reads_a_server_side_path(client, library):
    # a form field holding a path is not a file: refused, the file is never opened
    response = client.post("/api/tag", data={"audio": library[0]})
    assert response.status_code == 400 and "Expected UploadFile" in error_of(response)
    # a file name that is a path only names the upload
    response = client.post("/api/tag", files={"audio": ("/etc/passwd", b"x")})
    assert response.status_code == 422 and error_of(response).startswith("passwd: ")
    assert upload_name("../../a\nb.wav") == "ab.wav" and upload_name(None) == "upload"


def test_an_unknown_route_is_a_json_404(client):
    response = client.get("/api/nothing")
    assert response.status_code == 404 and error_of(response) == "Not Found"


# ----------------------------------------------------------------------------------------------
# Concurrency


def test_32_concurrent_requests_share_model_calls_and_each_gets_its_own_answer(
    tmp_path, checkpoint, tagger, monkeypatch
):
    paths = write_library(tmp_path, [4.0 + (i % 5) for i in range(32)])  # 32 different tones
    expected = [tagger.predict(p) for p in paths]
    service = Service(jaxtag.load(checkpoint, batch_size=64))
    batcher = service.batcher("probabilities")
    predict = batcher.scorer.predict_windows

    def slow_first_call(windows):  # the first call lasts while the other requests arrive
        if batcher.calls == 0:
            time.sleep(1.0)
        return predict(windows)

    monkeypatch.setattr(batcher.scorer, "predict_windows", slow_first_call)
    with serving_in_background(service) as url, httpx.Client(base_url=url, timeout=120) as http:

        def ask(i: int) -> dict:
            response = http.post("/api/tag", files=upload(paths[i], f"song{i}.wav"))
            assert response.status_code == 200, response.text
            return response.json()

        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(ask, range(32)))
    service.close()
    for answer, probs in zip(answers, expected, strict=True):
        np.testing.assert_allclose([answer["probabilities"][t] for t in TAGS], probs, atol=1e-5)
    # 16 windows a clip (the 16-chunk protocol), 64 a call: 8 calls would do, one a request
    # would be 32
    assert batcher.calls < 32
    assert max(batcher.requests_per_call) > 1  # calls held several requests' windows


# ----------------------------------------------------------------------------------------------
# The command


def test_jaxtag_serve_says_where_it_listens_answers_and_stops_on_ctrl_c(checkpoint, library):
    with jaxtag_serve(checkpoint) as (url, line):
        assert "(this machine only)" in line and url.startswith("http://127.0.0.1:"), line
        health = httpx.get(f"{url}/api/health", timeout=30).json()
        assert health["tags"] == TAGS and health["model"] == "ckpt"
        answer = httpx.post(f"{url}/api/tag", files=upload(library[3]), timeout=60).json()
        assert [t["label"] for t in answer["tags"]]
    err = stopped["stderr"]
    assert stopped["returncode"] in (0, 130), err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "jaxtag serve: stopped"


def test_jaxtag_serve_runs_from_the_core_install_and_the_serve_extra(checkpoint, library):
    # no train extra (TensorFlow, TFDS, ...) and no export extra (onnx): the jax engine serves
    core = ("tensorflow", "tensorflow_datasets", "ml_collections", "clu", "sklearn", "onnx",
            "onnxruntime")  # fmt: skip
    with jaxtag_serve(checkpoint, without=core) as (url, line):
        assert "jax engine" in line, line
        answer = httpx.post(f"{url}/api/tag", files=upload(library[3]), timeout=60)
        assert answer.status_code == 200 and len(answer.json()["probabilities"]) == len(TAGS)


def test_without_the_serve_extra_jaxtag_serve_says_what_to_install(checkpoint):
    code = (
        "import sys\n"
        "sys.modules['fastapi'] = sys.modules['uvicorn'] = None\n"
        "from jaxtag.cli import main\n"
        f"sys.exit(main(['serve', '--checkpoint', {str(checkpoint)!r}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "jaxtag serve: fastapi, uvicorn not installed; serving needs: pip install 'jaxtag[serve]'"
    )


def test_jaxtag_serve_help_says_it_binds_to_this_machine(capsys):
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "127.0.0.1" in out and "--max-upload-mb" in out and "--max-seconds" in out


def test_a_port_in_use_or_a_bad_limit_is_one_line_before_the_model_loads(checkpoint, capsys):
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        code = cli.main(["serve", "--checkpoint", "no-such-model", "--port", str(port)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"jaxtag serve: cannot listen on 127.0.0.1:{port} (Address already in use)"
    for flag, value in (
        ("--max-upload-mb", "0"),
        ("--max-seconds", "inf"),
        ("--max-seconds", "nan"),
    ):
        assert cli.main(["serve", "--checkpoint", str(checkpoint), flag, value]) == 2
        assert capsys.readouterr().err.strip() == (
            f"jaxtag serve: {flag} must be a number > 0, got {float(value):g}"
        )
