"""`geosurge review`: one self-contained HTML page to review estimates before applying them.

No network: the thumbnails are small JPEG data URIs, the world map is the shipped Natural Earth
1:110m countries (`maps.country_polygons`) as inline SVG, the script and styles are inline, and
a Content-Security-Policy forbids any fetch. The rows (photo, place name, probability, the top
alternatives and their places, EXIF GPS when the photo has it) travel as one JSON blob; the
script renders one page of rows at a time (`PAGE_SIZE`), sorts by confidence, filters by text,
probability and "untagged only", and exports the selected ids, one per line, as the file
`geosurge sidecars --only FILE` reads. Estimates pass the precision cap (`privacy.apply_cap`)
before anything is written into the page.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from geosurge_index.confidence import row_probability
from geosurge_index.errors import UserError
from geosurge_index.privacy import Cap, cap_cells, capped_places

TEMPLATE = Path(__file__).parent / "data" / "review.html"
PAGE_SIZE = 100
THUMB_PX = 96
THUMB_QUALITY = 70
MAX_ALTERNATIVES = 3
PLACE_FIELDS = ("country_code", "country_name", "admin1", "town")


@dataclass
class ReviewReport:
    out: Path
    photos: int  # rows on the page
    thumbnails: int
    bytes: int


def thumbnail(path: str | os.PathLike, px: int = THUMB_PX, quality: int = THUMB_QUALITY) -> str | None:
    """A photo -> a small JPEG as base64 (None when it cannot be read). JPEG draft mode decodes
    at 1/2..1/8 scale directly, so a 24 MP photo costs a few ms."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (px * 2, px * 2))
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((px, px), Image.BILINEAR)
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=quality, optimize=True)
        return base64.b64encode(buf.getvalue()).decode("ascii")
    except Exception:  # noqa: BLE001 - a photo that moved or broke gets no thumbnail, the row stays
        return None


def countries_svg() -> str:
    """The Natural Earth countries as SVG path data in lon/lat (y flipped by the page)."""
    from geosurge_index.maps import country_polygons

    parts = []
    for ring in country_polygons():
        pts = np.round(ring, 1)
        d = "M" + "L".join(f"{x:g},{y:g}" for x, y in pts) + "Z"
        parts.append(d)
    return f'<path d="{"".join(parts)}"/>'


def _place_text(place: dict) -> str:
    return ", ".join(str(place[k]) for k in ("town", "admin1", "country_name") if place.get(k))


def review_records(table, places_of, tree, cap_km: float | None = None) -> list[list]:
    """Prediction rows (capped already) -> the page's rows: [id, name, place, probability, lat,
    lon, [[alternative place, probability]...], EXIF GPS text or 0, thumbnail slot]. The
    probability shown, sorted and filtered on is the calibrated `confidence` when the rows have it
    (`confidence.row_probability`); the alternatives' are the model's own."""
    cc = cap_cells(tree) if tree is not None else None
    cols = table.to_pydict()
    n = table.num_rows
    out = []
    for i in range(n):
        if cols["error"][i] is not None or cols["lat"][i] is None:
            continue
        level = cols.get("cap_level", [None] * n)[i]
        if level is None:
            known = [lv for lv in range(1, 8) if cols.get(f"cell_l{lv}", [None] * n)[i] is not None]
            level = known[-1] if known else 0
        cell = cols[f"cell_l{level}"][i] if level else None
        place = places_of(level, cell) if cell is not None else dict.fromkeys(PLACE_FIELDS)
        if cols.get("cap_level", [None] * n)[i] is not None and cc is not None and cell is not None:
            place = capped_places(place, float(cc.extent[level - 1][cell]))
        alts = []
        topk, probs = (cols.get("topk_cells") or [None] * n)[i], (cols.get("topk_probs") or [None] * n)[i]
        if topk and probs:
            for c, p in list(zip(topk, probs, strict=False))[:MAX_ALTERNATIVES]:
                if c is not None and c >= 0:
                    alts.append([_place_text(places_of(tree.levels if tree else 7, c)) or f"cell {c}",
                                 round(float(p), 4)])
        tagged = 0
        if cols.get("exif_gps_valid", [None] * n)[i]:
            tagged = f"{cols['exif_lat'][i]:.5f}, {cols['exif_lon'][i]:.5f}"
        path = cols["path"][i] or ""
        out.append([cols["id"][i], os.path.basename(path) or cols["id"][i], _place_text(place),
                    round(row_probability({k: cols[k][i] for k in ("confidence", "probability") if k in cols}), 4),
                    round(float(cols["lat"][i]), 4),
                    round(float(cols["lon"][i]), 4), alts, tagged, path])
    return out


def render_page(records: list[list], thumbs: list[str | None], *, title: str, meta: str,
                page_size: int = PAGE_SIZE) -> str:
    """The HTML page: records (the last field a thumbnail slot index, -1 for none)."""
    data = {"meta": meta, "page_size": page_size, "rows": records, "thumbs": thumbs}
    blob = json.dumps(data, separators=(",", ":"), ensure_ascii=True).replace("</", "<\\/")
    page = TEMPLATE.read_text(encoding="utf-8")
    return (page.replace("__TITLE__", html.escape(title)).replace("__COUNTRIES__", countries_svg())
            .replace("__DATA__", blob))


def build_review(pred_dir, out, *, index_dir=None, cap: Cap | None = None, thumbs: bool = True,
                 threads: int = 4) -> ReviewReport:
    """PRED_DIR -> one self-contained HTML file at `out` (written atomically)."""
    from geosurge_index.index import IndexCells, read_tree
    from geosurge_index.progress import bar
    from geosurge_index.sidecars import atomic_write, capped_rows, read_rows, run_index

    out = Path(out)
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    index, index_id = run_index(pred_dir, index_dir)
    if not index or not Path(index).is_dir():
        raise UserError(f"the run's index ({index}) is not a folder: name it with --index (place names come from it)")
    table = capped_rows(read_rows(pred_dir), cap, index, pred_dir)
    tree = read_tree(index, 7)
    cache: dict[int, dict[str, list]] = {}
    with IndexCells.open(index) as cells:
        def places_of(level: int, cell: int) -> dict:
            if level not in cache:
                cache[level] = cells.places(level)
            return {k: cache[level][k][cell] for k in PLACE_FIELDS}

        records = review_records(table, places_of, tree)
    paths = [r[-1] for r in records]
    images: list[str | None] = [None] * len(paths)
    if thumbs and paths:
        with ThreadPoolExecutor(threads) as pool, bar(total=len(paths), desc="thumbnails", unit="photo") as pbar:
            for k, t in enumerate(pool.map(thumbnail, paths)):
                images[k] = t
                pbar.update(1)
    slots: list[str] = []
    for r, t in zip(records, images, strict=True):
        r[-1] = -1 if t is None else len(slots)
        if t is not None:
            slots.append(t)
    capped = sum(1 for v in (table.column("cap_km").to_pylist() if "cap_km" in table.column_names else [])
                 if v is not None)
    meta = (f"{len(records)} located photos from {pred_dir}; index {index_id or index}"
            + (f"; precision cap in force on {capped} rows" if capped else "")
            + ". Select photos and export the list for `geosurge sidecars --only FILE`.")
    page = render_page(records, slots, title="geosurge review", meta=meta)
    data = page.encode("utf-8")
    atomic_write(out, data)
    return ReviewReport(out, len(records), len(slots), len(data))
