"""The review page (issue 13, part 4) in a real browser: headless Chromium (Debian's `chromium`,
installed by `make install`) renders it without network; the rows are in the DOM after the
script ran, the screenshot is not blank, and the exported selection feeds `geosurge sidecars --only`."""

from __future__ import annotations

import re

import pytest
from PIL import Image
from test_sidecars import archive, located  # noqa: F401 - fixtures

from geosurge_index.bench.review import ROW_RE, chromium, run_chromium
from geosurge_index.cli import main as cli_main
from geosurge_index.sidecars import read_only_list

if chromium() is None:  # not a skip: the project's install step provides it
    raise RuntimeError("chromium is missing: `make install` installs Debian's chromium")


def test_review_page_renders_offline_and_exports_a_selection(archive, tmp_path, capsys):  # noqa: F811
    index_dir, photos, preds = archive
    page = tmp_path / "review.html"
    assert cli_main(["review", str(preds), "--out", str(page)]) == 0
    text = page.read_text()
    assert not re.search(r'(src|href)\s*=\s*["\']?https?:', text)  # nothing fetched: all inline
    assert text.count("data:image/jpeg;base64,") == 1  # the template; thumbnails travel in the JSON

    dom, _ = run_chromium(page)
    assert 'data-ready="1"' in dom  # the script ran to its end
    rows = ROW_RE.findall(dom)
    assert len(rows) == 6  # untagged only, by default: the 6 untagged photos
    probs = [float(p) for p in re.findall(r"<td>([\d.]+)%</td>", dom)]
    assert len(probs) == 6 and probs == sorted(probs, reverse=True)  # sorted by confidence
    assert dom.count("data:image/jpeg;base64,") >= 6 and "<circle" in dom  # thumbnails and map points

    shot = tmp_path / "shot.png"
    run_chromium(page, screenshot=shot)
    img = Image.open(shot).convert("RGB")
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200  # map, thumbnails, text: not a blank page
    lo, hi = img.convert("L").getextrema()
    assert hi - lo > 100

    dom, _ = run_chromium(page, fragment="#export-all")
    box = re.search(r'<textarea id="export"[^>]*>(.*?)</textarea>', dom, re.S).group(1)
    listed = tmp_path / "selection.txt"
    listed.write_text(box)
    ids = read_only_list(listed)
    assert len(ids) == 6
    capsys.readouterr()
    assert cli_main(["sidecars", str(preds), "--min-probability", "0", "--only", str(listed)]) == 0
    assert "6 written" in capsys.readouterr().err and len(list(photos.rglob("*.xmp"))) == 6


@pytest.mark.slow
def test_review_page_with_10000_photos_pages_its_rows(tmp_path):
    from geosurge_index.bench.review import synthetic_records
    from geosurge_index.review import PAGE_SIZE, render_page

    records, thumbs = synthetic_records(10_000)
    page = tmp_path / "big.html"
    page.write_text(render_page(records, thumbs, title="big", meta="10k"))
    dom, _ = run_chromium(page)
    assert 'data-ready="1"' in dom and len(ROW_RE.findall(dom)) == PAGE_SIZE
    assert "10000 of 10000 photos" not in dom  # untagged only by default
    assert re.search(r"\d+ of 10000 photos", dom)
