"""The Python API and the service give one answer per photo (issue 14): a class map travels with
an image by path, bytes, PIL image or HTTP; an untrained segmenter is announced once; errors name
the file; `from geosurge_index import Locator` and `with Locator.open(...)`."""

from __future__ import annotations

import io
import json
import logging

import httpx
import numpy as np
import pytest
from _service_fixtures import class_map_png, jpeg, tiny_locator
from PIL import Image

from geosurge_index.service.app import create_app
from geosurge_index.service.runner import ServerThread
from geosurge_index.settings import ServiceSettings


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    return tiny_locator(tmp_path_factory.mktemp("api"))


def top1(pred) -> int:
    return pred.cells[-1].cell_index


def test_path_bytes_pil_and_http_give_the_same_top1_with_the_same_class_map(index, tmp_path):
    index_dir, locator = index
    photos = {f"p{i}": (jpeg(30 + i, 120, 90), class_map_png(120, 90, seed=i)) for i in range(4)}
    for stem, (data, cmap) in photos.items():
        (tmp_path / f"{stem}.jpg").write_bytes(data)
        (tmp_path / f"{stem}.classmap.png").write_bytes(cmap)
    paths = [tmp_path / f"{s}.jpg" for s in photos]
    datas = [d for d, _ in photos.values()]
    maps = [m for _, m in photos.values()]
    by_path = [top1(p) for p in locator.locate(paths)]  # maps found beside the files
    by_bytes = [top1(p) for p in locator.locate(datas, class_maps=maps)]
    by_pil = [top1(p) for p in locator.locate([(Image.open(io.BytesIO(d)), Image.open(io.BytesIO(m)))
                                               for d, m in zip(datas, maps, strict=True)])]
    by_array = [top1(p) for p in locator.locate(
        datas, class_maps=[np.asarray(Image.open(io.BytesIO(m))) for m in maps])]
    app = create_app(ServiceSettings(index_dir=index_dir), locator)
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        by_name = c.post("/v1/locate", files=[("images", (f"{s}.jpg", d, "image/jpeg")) for s, (d, _) in photos.items()]
                         + [("class_maps", (f"{s}.classmap.png", m, "image/png")) for s, (_, m) in photos.items()])
        by_order = c.post("/v1/locate", files=[("images", ("x.jpg", d, "image/jpeg")) for d in datas]
                          + [("class_maps", ("m.png", m, "image/png")) for m in maps])
        import base64

        by_json = c.post("/v1/locate", json={"images": [
            {"data": base64.b64encode(d).decode(), "class_map": base64.b64encode(m).decode()}
            for d, m in zip(datas, maps, strict=True)]})
        immich = [c.post("/predict", data={"entries": json.dumps({"geolocation": {"visual": {"modelName": "g"}}})},
                         files=[("image", ("a.jpg", d, "image/jpeg")), ("class_map", ("a.png", m, "image/png"))])
                  for d, m in zip(datas, maps, strict=True)]
        unpaired = c.post("/v1/locate", files=[("images", ("a.jpg", datas[0], "image/jpeg")),
                                               ("images", ("b.jpg", datas[1], "image/jpeg")),
                                               ("class_maps", ("m.png", maps[0], "image/png"))])
    http = {name: [r["cells"][-1]["cell_index"] for r in resp.json()["results"]]
            for name, resp in (("by name", by_name), ("by order", by_order), ("json", by_json))}
    http["immich"] = [r.json()["geolocation"]["cells"][-1]["cell_index"] for r in immich]
    assert by_bytes == by_path and by_pil == by_path and by_array == by_path
    assert all(v == by_path for v in http.values()), (by_path, http)
    assert unpaired.status_code == 400 and unpaired.json()["kind"] == "unpaired_class_map"
    # the map matters: without it (the untrained segmenter) the embedding differs
    without = locator.locate(datas, return_embeddings=True)
    with_maps = locator.locate(datas, class_maps=maps, return_embeddings=True)
    assert not np.allclose(without[0].embedding, with_maps[0].embedding)
    # a given map replaces the one beside a path
    swapped = locator.locate([paths[0]], class_maps=[maps[1]], return_embeddings=True)[0]
    same = locator.locate([datas[0]], class_maps=[maps[1]], return_embeddings=True)[0]
    assert np.allclose(swapped.embedding, same.embedding, atol=1e-5)


def test_bad_class_maps_are_per_image_errors(index):
    _, locator = index
    rgb = Image.new("RGB", (8, 8))
    preds = locator.locate([jpeg(1), jpeg(2), jpeg(3)], class_maps=[b"not a png", rgb, np.zeros((4, 4, 3), np.uint8)],
                           ids=["a.jpg", "b.jpg", "c.jpg"])
    assert [p.error.split(":")[0] for p in preds] == ["bad_class_map"] * 3
    assert "a.jpg" in preds[0].error
    with pytest.raises(ValueError, match="class maps for"):
        locator.locate([jpeg(1)], class_maps=[None, None])


def test_untrained_segmenter_is_said_once_at_open_and_in_v1_index(index, caplog):
    from geosurge_index.locate import Locator
    from geosurge_index.locate.locator import segmenter_warning

    index_dir, locator = index
    note = segmenter_warning(index_dir)
    assert note and "untrained segmenter" in note and "class map" in note
    caplog.set_level(logging.WARNING)
    with Locator.open(index_dir, device="cpu") as opened:
        opened.locate([jpeg(1), jpeg(2)])
    said = [r for r in caplog.records if "untrained segmenter" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    app = create_app(ServiceSettings(index_dir=index_dir), locator)
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        seg = c.get("/v1/index").json()["segmenter"]
    assert seg == {"trained": False, "warning": note}


def test_a_trained_or_pretrained_segmenter_is_not_warned_about(index, tmp_path):
    import shutil

    from geosurge_index.locate.locator import segmenter_warning

    index_dir, _ = index
    copy = tmp_path / "idx"
    shutil.copytree(index_dir, copy)
    meta = json.loads((copy / "encoder.json").read_text())
    meta["segmenter_trained"] = True
    (copy / "encoder.json").write_text(json.dumps(meta))
    assert segmenter_warning(copy) is None
    meta.pop("segmenter_trained")
    meta["model"]["segmenter"]["pretrained"] = "shi-labs/oneformer_ade20k_swin_large"
    (copy / "encoder.json").write_text(json.dumps(meta))
    assert segmenter_warning(copy) is None


def test_geosurge_serve_says_it_once(index, tmp_path, capfd):
    """`geosurge serve` opens the index (and says so) before it binds; a bad port stops it after."""
    from geosurge_index.cli import main

    index_dir, _ = index
    with pytest.raises(BaseException):  # noqa: B017 - uvicorn exits on a port it cannot bind
        main(["serve", str(index_dir), "--host", "256.0.0.1", "--device", "cpu", "--log-level", "critical"])
    err = capfd.readouterr().err
    assert err.count("untrained segmenter") == 1, err


# -- messages and the package --------------------------------------------------------------------


def test_error_strings_name_the_file(index):
    _, locator = index
    empty, text = locator.locate([b"", b"text, not an image"], ids=["holiday.jpg", "notes.jpg"])
    assert "holiday.jpg" in empty.error and "notes.jpg" in text.error
    (anon,) = locator.locate([b""])
    assert "<bytes>" not in anon.error and "images[0]" in anon.error


def test_locator_from_the_package_and_as_a_context_manager(index):
    import geosurge_index

    index_dir, _ = index
    assert geosurge_index.Locator.__name__ == "Locator"
    from geosurge_index import Locator

    with Locator.open(index_dir, device="cpu") as locator:
        assert locator.locate([jpeg(1)])[0].ok
    assert locator.closed
    with pytest.raises(RuntimeError, match="closed"):
        locator.locate([jpeg(1)])
