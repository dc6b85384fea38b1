"""The archive's own GPS (issue 13, part 2): EXIF GPS read into the prediction rows, malformed GPS
treated as untagged with a note, `--skip-tagged`, and `geosurge eval --truth exif`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from _locate_fixtures import photo
from PIL import Image, TiffImagePlugin

from geosurge_index.cli import main as cli_main
from geosurge_index.exif_gps import read_gps
from geosurge_index.metrics import haversine_km

R = TiffImagePlugin.IFDRational


def dms(value: float) -> tuple:
    value = abs(value)
    d = int(value)
    m = int((value - d) * 60)
    s = round(((value - d) * 60 - m) * 60 * 10000)
    return (R(d, 1), R(m, 1), R(s, 10000))


def gps_ifd(lat: float, lon: float) -> dict:
    return {1: "N" if lat >= 0 else "S", 2: dms(lat), 3: "E" if lon >= 0 else "W", 4: dms(lon)}


def jpeg_with(gps: dict | None, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    kw = {}
    if gps is not None:
        exif = Image.Exif()
        exif[0x8825] = gps
        kw["exif"] = exif.tobytes()
    photo(96, 72, seed=seed).save(buf, "JPEG", **kw)
    return buf.getvalue()


MALFORMED = {
    "lat91.jpg": ({1: "N", 2: (R(91, 1), R(0, 1), R(0, 1)), 3: "E", 4: (R(2, 1), R(0, 1), R(0, 1))}, "beyond 90"),
    "zeroden.jpg": ({1: "N", 2: (R(48, 0), R(0, 1), R(0, 1)), 3: "E", 4: (R(2, 1), R(0, 1), R(0, 1))},
                    "zero denominator"),
    "norefs.jpg": ({2: (R(48, 1), R(0, 1), R(0, 1)), 4: (R(2, 1), R(0, 1), R(0, 1))}, "GPSLatitudeRef is missing"),
    "nullisland.jpg": ({1: "N", 2: (R(0, 1), R(0, 1), R(0, 1)), 3: "E", 4: (R(0, 1), R(0, 1), R(0, 1))}, "0,0"),
    "minutes60.jpg": ({1: "N", 2: (R(48, 1), R(61, 1), R(0, 1)), 3: "E", 4: (R(2, 1), R(0, 1), R(0, 1))},
                      "60 or more"),
}
TAGGED = {"paris.jpg": (48.8566, 2.3522), "sydney.jpg": (-33.8688, 151.2093), "lima.jpg": (-12.0464, -77.0428),
          "reykjavik.jpg": (64.1466, -21.9426)}


def test_read_gps_good_signed_and_malformed():
    for name, (lat, lon) in TAGGED.items():
        tag = read_gps(jpeg_with(gps_ifd(lat, lon)))
        assert tag.present and tag.valid and tag.note is None, name
        assert (tag.lat, tag.lon) == pytest.approx((lat, lon), abs=1e-6)
    for name, (ifd, why) in MALFORMED.items():
        tag = read_gps(jpeg_with(ifd))
        assert tag.present and not tag.valid and tag.lat is None and why in tag.note, (name, tag)
    assert read_gps(jpeg_with(None)) == read_gps(jpeg_with({})) and not read_gps(jpeg_with(None)).present
    png = io.BytesIO()
    photo().save(png, "PNG")
    assert not read_gps(png.getvalue()).present
    bad = read_gps(b"not an image")
    assert not bad.present and "unreadable" in bad.note


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    from geosurge_index.synthetic import random_index

    root = tmp_path_factory.mktemp("archive")
    index_dir = random_index(root / "index", n_points=1500, place_names=True)
    photos = root / "photos"
    photos.mkdir()
    for i, (name, (lat, lon)) in enumerate(TAGGED.items()):
        (photos / name).write_bytes(jpeg_with(gps_ifd(lat, lon), seed=i))
    for i, (name, (ifd, _)) in enumerate(MALFORMED.items()):
        (photos / name).write_bytes(jpeg_with(ifd, seed=10 + i))
    for i in range(3):
        (photos / f"untagged{i}.jpg").write_bytes(jpeg_with(None, seed=20 + i))
    return index_dir, photos


def rows_of(out: Path) -> dict[str, dict]:
    return {Path(r["path"]).name: r for r in pq.read_table(sorted(out.glob("part-*.parquet"))).to_pylist()}


def test_locate_reports_exif_and_skip_tagged_leaves_tagged_photos_out(archive, tmp_path):
    index_dir, photos = archive
    base = ["locate", str(index_dir), str(photos), "--device", "cpu", "--workers", "0"]
    assert cli_main([*base, "--out", str(tmp_path / "all")]) == 0
    rows = rows_of(tmp_path / "all")
    for name, (lat, lon) in TAGGED.items():
        r = rows[name]
        assert r["exif_gps_present"] and r["exif_gps_valid"] and r["error"] is None and r["lat"] is not None
        assert (r["exif_lat"], r["exif_lon"]) == pytest.approx((lat, lon), abs=1e-6)
    for name, (_, why) in MALFORMED.items():
        r = rows[name]
        assert r["exif_gps_present"] and not r["exif_gps_valid"] and r["exif_lat"] is None and why in r["exif_gps_note"]
        assert r["error"] is None and r["lat"] is not None  # untagged: located
    assert all(not rows[f"untagged{i}.jpg"]["exif_gps_present"] for i in range(3))

    assert cli_main([*base, "--out", str(tmp_path / "skip"), "--skip-tagged"]) == 0
    skip = rows_of(tmp_path / "skip")
    assert len(skip) == len(rows)  # every photo keeps its row
    for name in TAGGED:
        r = skip[name]
        assert r["error"].startswith("skipped_tagged:") and r["lat"] is None and r["exif_gps_valid"]
    for name in [*MALFORMED, "untagged0.jpg"]:
        assert skip[name]["error"] is None and skip[name]["lat"] == pytest.approx(rows[name]["lat"])
    from geosurge_index import pred_store

    assert pred_store.read_run(tmp_path / "skip")["settings"]["skip_tagged"] is True
    assert "skip_tagged" not in pred_store.read_run(tmp_path / "all")["settings"]


def test_eval_truth_exif_scores_the_tagged_photos(archive, tmp_path, capsys):
    index_dir, photos = archive
    out = tmp_path / "preds"
    assert cli_main(["locate", str(index_dir), str(photos), "--device", "cpu", "--workers", "0",
                     "--out", str(out)]) == 0
    capsys.readouterr()
    assert cli_main(["eval", str(out), "--truth", "exif", "--json", str(tmp_path / "e.json")]) == 0
    report = json.loads((tmp_path / "e.json").read_text())
    rows = rows_of(out)
    km = [haversine_km(rows[n]["lat"], rows[n]["lon"], lat, lon) for n, (lat, lon) in TAGGED.items()]
    assert report["n_truth"] == len(TAGGED)  # malformed GPS is untagged: not in the truth
    assert report["median_km"] == pytest.approx(float(np.median(km)), rel=1e-6)
    # after --skip-tagged there is nothing to score: a clear error
    skip = tmp_path / "skip"
    assert cli_main(["locate", str(index_dir), str(photos), "--device", "cpu", "--workers", "0",
                     "--out", str(skip), "--skip-tagged"]) == 0
    capsys.readouterr()
    assert cli_main(["eval", str(skip), "--truth", "exif"]) != 0
    assert "skip-tagged" in capsys.readouterr().err


def test_png_gps_is_read_from_the_header_without_decoding_pixels(monkeypatch):
    """Pillow's getexif on a PNG decodes the image to look for a late eXIf chunk: a 100 MP PNG
    would be decoded outside the service's pixel budget. Only the header is read."""
    from PIL import PngImagePlugin

    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x8825] = gps_ifd(48.8566, 2.3522)
    photo().save(buf, "PNG", exif=exif.tobytes())
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", lambda self: pytest.fail("pixels decoded"))
    tag = read_gps(buf.getvalue())
    assert tag.valid and (tag.lat, tag.lon) == pytest.approx((48.8566, 2.3522), abs=1e-6)
    plain = io.BytesIO()
    photo().save(plain, "PNG")
    assert not read_gps(plain.getvalue()).present
