"""The HTTP service, over real HTTP: uvicorn on 127.0.0.1 (a free port, in a thread) + httpx."""

from __future__ import annotations

import base64
import json
import threading

import httpx
import pytest
from _locate_fixtures import bad_images, encode, good_images, photo

from geosurge_index.bench.serve import load_test
from geosurge_index.cli import build_parser
from geosurge_index.errors import UserError
from geosurge_index.service.app import create_app
from geosurge_index.service.runner import ServerThread
from geosurge_index.settings import ServiceSettings
from geosurge_index.synthetic import synthetic_jpegs

# -- the index served -----------------------------------------------------------------------
# A real exported index (config-built model, random weights; issue 5's `random_index`) and the
# real `Locator`: the tests exercise the whole path, decoding to search and place names.


def tiny_locator(root):
    from geosurge_index.locate import Locator
    from geosurge_index.synthetic import random_index

    index_dir = random_index(root / "index", n_points=1500, place_names=True)
    return index_dir, Locator.open(index_dir, device="cpu")


# The status the service answers for each bad file of the shared corpus (tests/_locate_fixtures).
BAD_STATUS = {"zero_bytes": 400, "truncated": 422, "not_an_image": 415, "too_many_pixels": 413,
              "unsupported_format": 415}


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return tiny_locator(tmp_path_factory.mktemp("index"))


@pytest.fixture(scope="module")
def server(index):
    index_dir, locator = index
    settings = ServiceSettings(index_dir=index_dir, max_batch_size=8, max_wait_ms=20,
                               max_body_bytes=3_000_000, max_images_per_request=6)
    app = create_app(settings, locator)
    with ServerThread(app) as srv:
        srv.app = app
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def jpeg(seed: int = 1, w: int = 96, h: int = 72) -> bytes:
    return encode(photo(w, h, seed=seed), "JPEG", quality=90)


def assert_same_answer(a: dict, b: dict) -> None:
    """Equal answers up to float noise: a batch's composition changes the BLAS path (~1e-7)."""
    assert a.keys() == b.keys()
    for key, va in a.items():
        vb = b[key]
        if isinstance(va, float):
            assert vb == pytest.approx(va, rel=1e-4, abs=1e-9), key
        elif isinstance(va, list):
            assert len(va) == len(vb), key
            for x, y in zip(va, vb, strict=True):
                assert_same_answer(x, y)
        elif isinstance(va, dict):
            assert_same_answer(va, vb)
        else:
            assert va == vb, key


def post_files(client, files, **params):
    return client.post("/v1/locate", files=files, params=params)


# -- health -------------------------------------------------------------------------------------


def test_health_ready_ping(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    r = client.get("/ping")
    assert r.status_code == 200 and r.text == "pong"


def test_not_ready_until_the_index_loads(tmp_path):
    """No locator and an INDEX_DIR that cannot load: up (healthz) but not ready, and says why."""
    app = create_app(ServiceSettings(index_dir=tmp_path / "missing"))
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url) as c:
        assert c.get("/healthz").status_code == 200
        for _ in range(200):  # the background load fails fast; wait for it without timing it
            r = c.get("/readyz")
            if r.json().get("reason") != "the index is loading":
                break
            threading.Event().wait(0.02)
        assert r.status_code == 503 and "missing" in r.json()["reason"]
        r = c.post("/v1/locate", files={"images": ("a.jpg", jpeg(), "image/jpeg")})
        assert r.status_code == 503 and r.json()["kind"] == "not_ready"


# -- /v1/locate --------------------------------------------------------------------------------


def check_result(res: dict, name: str, w: int, h: int, top_k: int, cells: bool) -> None:
    assert res["name"] == name and res["error"] is None
    assert (res["width"], res["height"]) == (w, h)
    assert -90 <= res["lat"] <= 90 and -180 <= res["lon"] <= 180
    assert 0 < res["probability"] <= 1
    assert 1 <= len(res["alternatives"]) <= top_k
    probs = [a["probability"] for a in res["alternatives"]]
    assert probs == sorted(probs, reverse=True)
    assert res["alternatives"][0]["probability"] == pytest.approx(res["probability"])
    assert set(res["place"]) == {"country_code", "country_name", "admin1", "town"}
    if cells:
        levels = [c["level"] for c in res["cells"]]
        assert levels == sorted(levels) and levels[0] == 1
        assert all(isinstance(c["s2_token"], str) and c["s2_token"] for c in res["cells"])
        assert res["cells"][-1]["cell_index"] == res["alternatives"][0]["cell_index"]
    else:
        assert "cells" not in res


def test_locate_one_multipart_image(client):
    r = post_files(client, {"images": ("a.jpg", jpeg(1), "image/jpeg")}, top_k=3)
    assert r.status_code == 200, r.text
    (res,) = r.json()["results"]
    check_result(res, "a.jpg", 96, 72, top_k=3, cells=True)


def test_content_type_is_case_insensitive(client):
    body = (b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + jpeg(1) + b"\r\n--x--\r\n")
    r = client.post("/v1/locate", content=body, headers={"content-type": "Multipart/Form-Data; boundary=x"})
    assert r.status_code == 200, r.text


def test_locate_several_images_every_format_in_order(client):
    imgs = {k: v for k, v in good_images().items() if k in ("a.jpg", "b.png", "c.webp", "rotated.jpg", "alpha.png")}
    files = [("images", (name, data, "application/octet-stream")) for name, data in imgs.items()]
    r = post_files(client, files, top_k=2, include_cells="false")
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["name"] for x in results] == list(imgs)
    sizes = {"rotated.jpg": (72, 96), "alpha.png": (64, 64)}  # EXIF orientation 6 swaps the sides
    for res in results:
        check_result(res, res["name"], *sizes.get(res["name"], (96, 72)), top_k=2, cells=False)


def test_true_size_of_a_large_rotated_jpeg_decoded_in_draft_mode(client):
    """The locator decodes JPEGs by DCT scaling to about its input size; the answer still gives
    the photo's size as seen (EXIF orientation 6: a 640x480 file is seen as 480x640)."""
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(photo(640, 480, seed=11), "JPEG", exif=exif)
    r = post_files(client, {"images": ("big.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text
    check_result(r.json()["results"][0], "big.jpg", 480, 640, top_k=5, cells=True)


def test_json_base64_gives_the_same_answer_as_multipart(client):
    data = jpeg(3)
    a = post_files(client, {"image": ("x.jpg", data, "image/jpeg")}).json()["results"][0]
    body = {"images": [{"name": "x.jpg", "data": base64.b64encode(data).decode()},
                       "data:image/jpeg;base64," + base64.b64encode(data).decode()]}
    r = client.post("/v1/locate", json=body)
    assert r.status_code == 200, r.text
    b, c = r.json()["results"]
    assert_same_answer(b, a)
    assert_same_answer(c, {**a, "name": "images[1]"})


def test_different_images_get_answers_of_their_own(client):
    """Batching must not mix answers up: each image's answer equals its answer when sent alone."""
    datas = [jpeg(seed) for seed in range(20, 26)]
    alone = [post_files(client, {"images": ("i.jpg", d, "image/jpeg")}).json()["results"][0] for d in datas]
    together = post_files(client, [("images", ("i.jpg", d, "image/jpeg")) for d in datas]).json()["results"]
    for x, y in zip(together, alone, strict=True):
        assert_same_answer(x, y)
    # the answers differ from image to image (random weights: in probabilities if not in cells),
    # so a mix-up would show
    assert len({x["probability"] for x in alone}) == len(datas)


# -- cells and index ---------------------------------------------------------------------------


def test_cell_lookup_matches_the_located_cell(client):
    res = post_files(client, {"images": ("a.jpg", jpeg(1), "image/jpeg")}).json()["results"][0]
    for cell in res["cells"]:
        r = client.get(f"/v1/cells/{cell['level']}/{cell['cell_index']}")
        assert r.status_code == 200, r.text
        row = r.json()
        assert (row["level"], row["cell_index"], row["s2_token"]) == (cell["level"], cell["cell_index"], cell["s2_token"])
    assert client.get("/v1/cells/1/999999").status_code == 404
    assert client.get("/v1/cells/99/0").status_code == 404
    assert client.get("/v1/cells/one/0").status_code == 422


def test_index_summary(client, server):
    r = client.get("/v1/index")
    assert r.status_code == 200
    body = r.json()
    assert body["index_dir"] == str(server.app.state.service.settings.index_dir)
    assert body["manifest"] is not None and "checksums" not in body["manifest"]


# -- immich's machine-learning shape -----------------------------------------------------------


def immich(client, data: bytes | None, entries) -> httpx.Response:
    form = {"entries": entries if isinstance(entries, str) else json.dumps(entries)}
    files = {"image": ("photo.jpg", data, "image/jpeg")} if data is not None else None
    return client.post("/predict", data=form, files=files)


def test_immich_predict(client):
    data = jpeg(4, 120, 80)
    entries = {"geolocation": {"visual": {"modelName": "geosurge", "options": {"topK": 2}}}}
    r = immich(client, data, entries)
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"geolocation", "imageHeight", "imageWidth"}
    assert (body["imageWidth"], body["imageHeight"]) == (120, 80)
    geo = body["geolocation"]
    check_result(geo, "photo.jpg", 120, 80, top_k=2, cells=True)
    ours = post_files(client, {"images": ("photo.jpg", data, "image/jpeg")}, top_k=2).json()["results"][0]
    assert_same_answer(geo, ours)  # one mapping for both routes


@pytest.mark.parametrize("entries", [
    "not json",
    {"geolocation": {"visual": {}}},  # no modelName
    {"geolocation": {"textual": {"modelName": "x"}}},
    {"clip": {"visual": {"modelName": "ViT-B-32__openai"}}},  # a task we do not answer
    {"geolocation": {"visual": {"modelName": "x", "options": {"topK": 0}}}},
])
def test_immich_bad_entries_are_422(client, entries):
    assert immich(client, jpeg(), entries).status_code == 422


def test_immich_without_image_is_400(client):
    r = immich(client, None, {"geolocation": {"visual": {"modelName": "x"}}})
    assert r.status_code == 400 and "image" in r.json()["detail"]


# -- bad input -------------------------------------------------------------------------------


def test_bad_input_corpus_gets_4xx_and_the_server_stays_up(client):
    answers = {}
    for name, (data, kind) in bad_images().items():
        r = post_files(client, {"images": (name, data, "image/jpeg")})
        answers[name] = r.status_code
        assert r.status_code == BAD_STATUS[kind], (name, r.status_code, r.text)
        assert name in r.json()["detail"] and r.json()["kind"] == kind  # names the image and the problem
    cases = {
        "wrong field name": lambda: post_files(client, {"photo": ("a.jpg", jpeg(), "image/jpeg")}),
        "text field instead of a file": lambda: client.post(
            "/v1/locate", content=b'--x\r\nContent-Disposition: form-data; name="images"\r\n\r\na.jpg\r\n--x--\r\n',
            headers={"content-type": "multipart/form-data; boundary=x"}),
        "form-urlencoded": lambda: client.post("/v1/locate", data={"images": "a.jpg"}),
        "no images": lambda: client.post("/v1/locate", json={"images": []}),
        "wrong JSON key": lambda: client.post("/v1/locate", json={"imgs": ["AAAA"]}),
        "bad base64": lambda: client.post("/v1/locate", json={"images": ["%%% not base64 %%%"]}),
        "malformed JSON": lambda: client.post("/v1/locate", content=b"{", headers={"content-type": "application/json"}),
        "malformed multipart": lambda: client.post(
            "/v1/locate", content=b"--x\r\ngarbage", headers={"content-type": "multipart/form-data; boundary=x"}),
        "text/plain body": lambda: client.post("/v1/locate", content=b"hello", headers={"content-type": "text/plain"}),
        "top_k=0": lambda: post_files(client, {"images": ("a.jpg", jpeg(), "image/jpeg")}, top_k=0),
        "top_k=abc": lambda: post_files(client, {"images": ("a.jpg", jpeg(), "image/jpeg")}, top_k="abc"),
        "too many images": lambda: post_files(client, [("images", (f"{i}.jpg", jpeg(i), "image/jpeg")) for i in range(7)]),
    }
    expected = {"wrong field name": 400, "text field instead of a file": 400, "no images": 400,
                "wrong JSON key": 400, "bad base64": 400, "malformed JSON": 400, "malformed multipart": 400,
                "text/plain body": 415, "form-urlencoded": 415, "top_k=0": 422, "top_k=abc": 422, "too many images": 413}
    for name, call in cases.items():
        r = call()
        answers[name] = r.status_code
        assert r.status_code == expected[name], (name, r.status_code, r.text)
    print("bad-input answers:", answers)
    assert client.get("/healthz").status_code == 200
    assert post_files(client, {"images": ("a.jpg", jpeg(), "image/jpeg")}).status_code == 200


def test_far_too_many_images_is_413_not_a_form_parser_400(client):
    # beyond the form parser's own cap (max_images_per_request + 16 files) the answer stays 413
    files = [("images", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(40)]
    r = post_files(client, files)
    assert r.status_code == 413 and r.json()["kind"] == "too_many_images", r.text
    r = client.post("/predict", data={"entries": '{"geolocation": {"visual": {"modelName": "g"}}}'},
                    files=[("image", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(40)])
    assert r.status_code == 413, r.text


def test_too_many_form_fields_is_an_error_in_our_shape(client):
    # schemathesis found starlette's own 400 ("Too many fields") answered without `kind`
    r = client.post("/v1/locate", data={f"f{i}": "x" for i in range(60)},
                    files=[("images", ("a.jpg", b"x", "image/jpeg"))])
    assert r.status_code == 400 and r.json()["kind"] == "bad_form" and "fields" in r.json()["detail"], r.text


def test_one_bad_image_among_good_ones_gets_its_own_error(client):
    """Issue 14: the good images are answered, the bad one gets a per-image error naming it."""
    good, other = jpeg(1), jpeg(2)
    files = [("images", ("good.jpg", good, "image/jpeg")), ("images", ("bad.jpg", b"", "image/jpeg")),
             ("images", ("text.jpg", b"not an image at all", "image/jpeg")),
             ("images", ("other.jpg", other, "image/jpeg"))]
    r = post_files(client, files)
    assert r.status_code == 200, r.text
    a, bad, text, b = r.json()["results"]
    assert (bad["name"], bad["error_kind"], bad["lat"], bad["alternatives"]) == ("bad.jpg", "zero_bytes", None, [])
    assert "bad.jpg" in bad["error"] and "<bytes>" not in bad["error"]
    assert text["error_kind"] == "not_an_image" and "text.jpg" in text["error"]
    alone = [post_files(client, {"images": (n, d, "image/jpeg")}).json()["results"][0]
             for n, d in (("good.jpg", good), ("other.jpg", other))]
    assert_same_answer(a, alone[0])
    assert_same_answer(b, alone[1])
    assert a["error"] is None and a["error_kind"] is None
    # every image unusable: the request's 4xx, naming the first
    r = post_files(client, [("images", ("bad.jpg", b"", "image/jpeg")), ("images", ("x.jpg", b"", "image/jpeg"))])
    assert r.status_code == 400 and "bad.jpg" in r.json()["detail"]


def test_body_over_the_limit_is_413(client):
    big = b"\xff" * 3_500_000
    r = post_files(client, {"images": ("big.jpg", big, "image/jpeg")})  # Content-Length says so
    assert r.status_code == 413 and r.json()["kind"] == "body_too_large"

    def chunks():  # no Content-Length: counted while it streams in
        for _ in range(35):
            yield b"\xff" * 100_000

    r = client.post("/v1/locate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413

    def multipart_chunks():
        yield b'--b\r\nContent-Disposition: form-data; name="images"; filename="a.jpg"\r\n\r\n'
        yield from chunks()

    r = client.post("/v1/locate", content=multipart_chunks(),
                    headers={"content-type": "multipart/form-data; boundary=b"})
    assert r.status_code == 413
    assert client.get("/healthz").status_code == 200


def test_pixel_cap_from_settings(index):
    index_dir, locator = index
    app = create_app(ServiceSettings(index_dir=index_dir, max_pixels=5000), locator)
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url) as c:
        ok = c.post("/v1/locate", files={"images": ("s.jpg", jpeg(1, 70, 70), "image/jpeg")})
        big = c.post("/v1/locate", files={"images": ("b.jpg", jpeg(1, 80, 70), "image/jpeg")})
    assert ok.status_code == 200
    assert big.status_code == 413 and big.json()["kind"] == "too_many_pixels" and "80x70" in big.json()["detail"]


# -- API key -----------------------------------------------------------------------------------


def test_api_key(index):
    index_dir, locator = index
    app = create_app(ServiceSettings(index_dir=index_dir, api_key="s3cret-key"), locator)
    files = {"images": ("a.jpg", jpeg(), "image/jpeg")}
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        assert c.get("/healthz").status_code == 200  # probes need no key
        assert c.get("/ping").text == "pong"
        assert c.post("/v1/locate", files=files).status_code == 401
        assert c.post("/v1/locate", files=files, headers={"X-API-Key": "s3cret-kex"}).status_code == 401
        assert c.post("/v1/locate", files=files, headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get("/v1/index").status_code == 401
        assert c.post("/v1/locate", files=files, headers={"X-API-Key": "s3cret-key"}).status_code == 200
        assert c.post("/v1/locate", files=files, headers={"Authorization": "Bearer s3cret-key"}).status_code == 200
        r = c.post("/predict", data={"entries": '{"geolocation": {"visual": {"modelName": "g"}}}'},
                   files={"image": ("a.jpg", jpeg(), "image/jpeg")})
        assert r.status_code == 401


# -- load and batching -------------------------------------------------------------------------


def test_load_32_clients_none_fail_and_requests_are_batched(server, client):
    before = client.get("/v1/stats").json()["batching"]
    report = load_test(server.url, synthetic_jpegs(8, (160, 120)), clients=32, requests=256)
    print(f"\nload test (2-core shared CPU, tiny model: figures are noise, not targets): {report.summary()}")
    assert report.failures == [] and report.statuses == {200: 256}
    after = client.get("/v1/stats").json()["batching"]
    print("batch sizes seen:", after["batch_size_counts"])
    assert after["items"] - before["items"] == 256
    assert after["batches"] - before["batches"] < 256  # several requests shared model calls
    assert after["max_batch_size_seen"] > 1
    assert after["max_batch_size_seen"] <= 8  # never beyond --max-batch-size


# -- settings and CLI --------------------------------------------------------------------------


def test_settings_flag_over_environment_over_default(tmp_path):
    env = {"GEOSURGE_PORT": "9001", "GEOSURGE_MAX_BATCH_SIZE": "4", "GEOSURGE_API_KEY": "k",
           "GEOSURGE_MAX_WAIT_MS": "2.5"}
    args = build_parser().parse_args(["serve", str(tmp_path), "--port", "9002"])
    s = ServiceSettings.from_args(args, environ=env)
    assert (s.port, s.max_batch_size, s.api_key, s.max_wait_ms, s.host) == (9002, 4, "k", 2.5, "127.0.0.1")
    assert s.public_dict()["api_key"] == "***"
    assert ServiceSettings.from_env({}).port == 8000
    with pytest.raises(UserError, match="GEOSURGE_MAX_BATCH_SIZE"):
        ServiceSettings.from_env({"GEOSURGE_MAX_BATCH_SIZE": "many"})
    with pytest.raises(UserError, match="max_queue"):
        ServiceSettings.from_env({"GEOSURGE_MAX_QUEUE": "0"})
    assert ServiceSettings.from_env({"GEOSURGE_TEN_CROP": "true"}).ten_crop is True
    assert ServiceSettings.from_env({}).ten_crop is False
    with pytest.raises(UserError, match="GEOSURGE_TEN_CROP"):
        ServiceSettings.from_env({"GEOSURGE_TEN_CROP": "maybe"})


def test_serve_help_lists_every_setting(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--host", "--port", "--api-key", "--max-batch-size", "--max-wait-ms", "--max-body-bytes",
                 "--max-pixels", "GEOSURGE_API_KEY", "/predict", "/v1/locate"):
        assert flag in out


def test_serve_refuses_a_missing_index_dir(tmp_path):
    from geosurge_index.cli import main

    assert main(["serve", str(tmp_path / "nope")]) == 2


@pytest.mark.slow
def test_geosurge_serve_subprocess_takes_settings_from_the_environment(index):
    """The CLI path: `geosurge serve INDEX_DIR` under uvicorn in its own process, settings from
    GEOSURGE_* variables (the API key among them)."""
    from geosurge_index.service.runner import ServeProcess

    index_dir, _ = index
    settings = ServiceSettings(index_dir=index_dir, api_key="env-key", max_batch_size=3, log_level="warning")
    server = ServeProcess(settings)
    try:
        server.wait_ready(timeout_s=300)
        with httpx.Client(base_url=server.url, timeout=60) as c:
            files = {"images": ("a.jpg", jpeg(), "image/jpeg")}
            assert c.post("/v1/locate", files=files).status_code == 401
            r = c.post("/v1/locate", files=files, headers={"X-API-Key": "env-key"})
            assert r.status_code == 200, r.text
            stats = c.get("/v1/stats", headers={"X-API-Key": "env-key"}).json()
        assert stats["settings"]["max_batch_size"] == 3 and stats["settings"]["api_key"] == "***"
        assert stats["batching"]["items"] == 1
    finally:
        server.stop()
    assert server.proc.returncode is not None


def test_load_report_counts_each_request_once():
    from geosurge_index.bench.serve import LoadReport

    r = LoadReport(latencies_s=[0.1, 0.2, 0.3, 0.4, 0.5], statuses={200: 4, 503: 1},
                   failures=["request 4: HTTP 503", "request 5: ConnectError"], transport_errors=1,
                   wall_s=1.0)
    assert r.requests == 6  # the 503 is an answer and a failure, but one request
    assert r.percentile(50) == 0.3 and r.percentile(100) == 0.5
    assert "transport failures 1" in r.summary()


# -- the routes table, the timers, decoding (issue 11) -------------------------------------------


def test_the_routes_table_is_the_apps_routes(tmp_path, capsys):
    """`service/routes.py` lists the routes once: the app serves exactly those, asks for the API
    key where the table says, and `geosurge serve --help` prints them."""
    from fastapi.testclient import TestClient

    from geosurge_index.service.routes import ROUTES

    app = create_app(ServiceSettings(index_dir=tmp_path, api_key="k"))
    served = {(m.upper(), path) for path, ops in app.openapi()["paths"].items() for m in ops}
    assert served == {(r.method, r.path) for r in ROUTES}
    client = TestClient(app)  # no lifespan: nothing loads, which the key check does not need
    for r in ROUTES:
        answer = client.request(r.method, r.path.replace("{level}", "1").replace("{cell_index}", "0"))
        assert (answer.status_code == 401) == r.api_key, (r.path, answer.status_code)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = capsys.readouterr().out
    assert all(f"{r.method} {r.path}" in out for r in ROUTES)


def _slow_multipart(fields: dict[str, tuple[str | None, bytes]], pause_s: float):
    """A multipart body streamed in three parts with `pause_s` between them (a slow upload)."""
    parts = []
    for name, (filename, data) in fields.items():
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        parts.append(f"--b\r\nContent-Disposition: {disp}\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + b"--b--\r\n"
    third = len(body) // 3

    def gen():
        yield body[:third]
        threading.Event().wait(pause_s)
        yield body[third:2 * third]
        threading.Event().wait(pause_s)
        yield body[2 * third:]

    return gen(), {"content-type": "multipart/form-data; boundary=b"}


@pytest.mark.parametrize("route", ["/v1/locate", "/predict"])
def test_both_routes_time_from_the_body_read(server, client, route):
    """/v1/locate and /predict start their latency timers at the same point, once the body is read:
    a slow upload is not server time."""
    import time

    pause = 0.8
    fields = {"images": ("a.jpg", jpeg(5))} if route == "/v1/locate" else {
        "entries": (None, b'{"geolocation": {"visual": {"modelName": "g"}}}'), "image": ("a.jpg", jpeg(5))}
    content, headers = _slow_multipart(fields, pause)
    latencies = server.app.state.service.latencies
    n = len(latencies)
    t0 = time.perf_counter()
    r = client.post(route, content=content, headers=headers)
    wall = time.perf_counter() - t0
    assert r.status_code == 200, r.text
    assert len(latencies) == n + 1
    assert latencies[-1] < wall - 1.5 * pause  # the 2 x pause upload is not in it


def test_decoding_reads_the_header_once_and_refuses_bombs_before_any_pixel(index, monkeypatch):
    """No second header probe in the service: the decoder's own probe applies the service's pixel
    cap (413) before any pixel is decoded."""
    from PIL import Image

    from geosurge_index import images
    from geosurge_index.service.requests import ApiError, decode_upload

    _, locator = index
    probes, loads = [], []
    probe = images.probe_image
    monkeypatch.setattr(images, "probe_image", lambda *a, **k: probes.append(1) or probe(*a, **k))
    load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(1) or load(self))

    data = jpeg(1, 80, 70)
    probes.clear(), loads.clear()
    ok = decode_upload(locator, data, "ok.jpg", max_pixels=80 * 70)
    assert (ok.width, ok.height) == (80, 70) and len(probes) == 1 and loads
    probes.clear(), loads.clear()
    with pytest.raises(ApiError) as err:
        decode_upload(locator, data, "big.jpg", max_pixels=80 * 70 - 1)
    assert err.value.status == 413 and err.value.kind == "too_many_pixels"
    assert "big.jpg" in err.value.message and "80x70" in err.value.message
    assert len(probes) == 1 and loads == []  # refused on the header, nothing decoded


def test_open_locator_takes_the_settings_vocabulary(index):
    """`Locator.open(settings=...)` takes the shared knobs (the service's as they are); a keyword
    overrides one of them."""
    from geosurge_index.locate import Locator
    from geosurge_index.service.state import open_locator

    index_dir, _ = index
    settings = ServiceSettings(index_dir=index_dir, device="cpu", default_top_k=3, draft_size=0,
                               max_pixels=5000, ten_crop=True)
    served = open_locator(settings)
    assert served.predictor.settings.top_k == 3 and served.predictor.settings.ten_crop
    assert (served.spec.draft_size, served.spec.max_pixels, served.spec.ten_crop) == (0, 5000, True)
    mine = Locator.open(index_dir, settings=settings, top_k=2, ten_crop=False)
    assert mine.predictor.settings.top_k == 2 and not mine.spec.ten_crop and mine.spec.max_pixels == 5000
    plain = Locator.open(index_dir, device="cpu")  # today's keywords, today's defaults
    assert plain.predictor.settings.top_k == 5 and plain.spec.draft_size == plain.image_size


def test_the_old_server_module_still_works_and_says_it_is_deprecated():
    import importlib
    import sys

    sys.modules.pop("geosurge_index.server", None)
    with pytest.warns(DeprecationWarning, match="geosurge_index.service"):
        server = importlib.import_module("geosurge_index.server")
    from geosurge_index.service import app, requests, runner, state

    assert server.create_app is app.create_app and server.ServerThread is runner.ServerThread
    assert server.free_port is runner.free_port and server.decode_upload is requests.decode_upload
    assert server.ApiError is requests.ApiError and server.LocateJob is state.ModelJob


def test_bench_images_from_a_folder(tmp_path):
    from geosurge_index.bench.serve import bench_images

    for name in ("a.jpg", "b.PNG", "c.webp", "a.classmap.png", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    images, what = bench_images(tmp_path)
    assert len(images) == 3 and "3 photos" in what
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no .jpg"):
        bench_images(tmp_path / "empty")


def test_per_level_probabilities_are_computed_only_when_cells_are_asked(index, server, client, monkeypatch):
    _, locator = index
    calls = []
    real = locator.index.engine.level_probabilities
    monkeypatch.setattr(locator.index.engine, "level_probabilities",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    files = {"images": ("a.jpg", jpeg(5), "image/jpeg")}
    lean = client.post("/v1/locate?include_cells=false", files=files).json()["results"][0]
    assert "cells" not in lean and calls == []
    full = client.post("/v1/locate", files=files).json()["results"][0]
    assert calls and all(0 < c["probability"] <= 1 for c in full["cells"])
    assert (lean["lat"], lean["lon"]) == (full["lat"], full["lon"])
