"""The Python API: `Locator.open(INDEX_DIR)`; `locator.locate([paths | bytes | PIL images]) ->
[Prediction]`. The same reader, mapper and search stages as the bulk runner, on images in memory.

    from geosurge_index import Locator
    with Locator.open("index/") as locator:
        preds = locator.locate(["a.jpg", photo_bytes], class_maps=[None, map_png_bytes])

A class map (ADE20K ids, the `<stem>.classmap.png` format) given with an image skips the segmenter
for it; an index whose segmenter was never trained says so once, when it is opened
(`segmenter_warning`)."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from geosurge_index.calibration import WITHIN_COLUMNS
from geosurge_index.index import PLACE_COLUMNS  # noqa: F401 - re-exported
from geosurge_index.locate.decode import Decoded, DecodeSpec, collate, decode_any
from geosurge_index.locate.predictor import Predictor, SearchSettings
from geosurge_index.privacy import Cap, CapInfo, apply_cap
from geosurge_index.settings import UNSET, InferenceSettings

log = logging.getLogger("geosurge.locate")


@dataclass(frozen=True)
class CellPrediction:
    """The best cell at one level (the ancestors of the best finest cell)."""

    level: int
    cell_index: int
    s2_token: str
    probability: float | None  # the level's softmax over all its cells, at this cell; None when
    #                             `locate(..., cell_probabilities=False)` skipped computing it
    confidence: float | None = None  # P(true point in this cell): calibrated when `Prediction.calibrated`


@dataclass(frozen=True)
class Alternative:
    """One of the top-k finest cells."""

    cell_index: int
    s2_token: str
    probability: float
    lat: float
    lon: float
    level: int | None = None  # None: a finest cell; under a precision cap the level of the capped cell
    #                           (0: an S2 cell coarser than level 1), probabilities summed within it


@dataclass(frozen=True)
class Prediction:
    """One image's prediction. On error only `error`, `id` (and the size when known) are set."""

    lat: float | None
    lon: float | None
    probability: float | None
    cells: list[CellPrediction]
    alternatives: list[Alternative]
    country_code: str | None
    country_name: str | None
    admin1: str | None
    town: str | None
    width: int | None
    height: int | None
    error: str | None = None
    id: str | None = None
    embedding: list[float] | None = None
    # `confidence.py`: P(true point in the reported finest cell), the error radii (km around lat/lon
    # holding 50% / 90% of the posterior), and whether the index's calibration made them
    confidence: float | None = None
    r50_km: float | None = None
    r90_km: float | None = None
    calibrated: bool | None = None
    cap: CapInfo | None = None  # the precision cap this answer was cut to (`privacy.apply_cap`)
    # how lat/lon were made (PRED_DIR's columns of the same names): "cell_mean", or with galleries
    # "neighbour" / "neighbours"; the nearest reference's gallery, id and cosine; the cell's mean point
    point_source: str | None = None
    neighbour_gallery: str | None = None
    neighbour_id: str | None = None
    neighbour_similarity: float | None = None
    cell_lat: float | None = None
    cell_lon: float | None = None
    # `confidence.py`: P(true point within 1 / 25 / 200 / 750 / 2500 km of lat/lon), calibrated when
    # `calibrated` (`calibration.WITHIN_COLUMNS`, the PRED_DIR columns of the same names)
    p_within_1km: float | None = None
    p_within_25km: float | None = None
    p_within_200km: float | None = None
    p_within_750km: float | None = None
    p_within_2500km: float | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)




def segmenter_warning(index_dir: str | os.PathLike) -> str | None:
    """A plain-words warning when the index's segmenter was never trained (encoder.json: a
    segmenter built from its config, `pretrained: null`, and not marked trained with
    `"segmenter_trained": true`), so that images located without a class map get worse answers;
    None when the segmenter is pretrained or trained, or there is none (maps are then required)."""
    from geosurge_index.formats import read_json
    from geosurge_index.model.encoder_io import ENCODER_FORMAT, ENCODER_JSON, ENCODER_VERSION

    path = Path(index_dir) / ENCODER_JSON
    if not path.is_file():
        return None
    meta = read_json(path, ENCODER_FORMAT, ENCODER_VERSION)
    seg = (meta.get("model") or {}).get("segmenter") or {}
    if seg.get("kind", "none") == "none" or seg.get("pretrained") is not None:
        return None
    if meta.get("segmenter_trained") or seg.get("trained") or seg.get("trained_on"):
        return None
    return (f"the index {os.fspath(index_dir)} has an untrained segmenter (random weights, "
            "`pretrained: null`): photos located without a class map get much less accurate answers. "
            "Give each photo its class map (a <stem>.classmap.png beside it, `geosurge segment`, or "
            "class_map= / the HTTP class_map field), or export the index with a trained segmenter.")


def _read_places(index_dir: Path, level: int) -> dict[str, list]:
    """Place-name columns of one level's cells (None everywhere when the index has none)."""
    from geosurge_index.index import IndexCells

    with IndexCells.open(index_dir) as cells:
        return cells.places(level)


class Locator:
    """`Locator.open(INDEX_DIR)`; `locator.locate([paths | bytes | PIL images]) -> [Prediction]`.

    One model call per `locate` (give it a batch). Safe to call from any one thread at a time,
    and concurrent calls are serialised by a lock, so a server may call it from a worker thread.
    A context manager: `with Locator.open(d) as locator: ...` releases the model on exit.
    """

    def __init__(self, predictor: Predictor, spec: DecodeSpec, places: dict[str, list] | None = None,
                 segmenter_note: str | None = None):
        if predictor.settings.ten_crop != spec.ten_crop:
            raise ValueError("the predictor's and the decode spec's ten_crop settings differ")
        self.predictor = predictor
        self.spec = spec
        self.index = predictor.index
        n_finest = self.index.tree.sizes[-1]
        self.places = places or {c: [None] * n_finest for c in PLACE_COLUMNS}
        self.segmenter_note = segmenter_note  # `segmenter_warning`'s text, or None
        self._lock = threading.Lock()
        self.cap: Cap | None = None  # the precision cap of every answer (`open(settings=...)`'s)
        self.index_dir: Path | None = None
        self._level_places: dict[int, dict[str, list]] = {}

    def __enter__(self) -> Locator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the model and the index (GPU memory with them); `locate` refuses afterwards."""
        with self._lock:
            self.predictor = self.index = None  # type: ignore[assignment]

    @property
    def closed(self) -> bool:
        return self.predictor is None

    @classmethod
    def open(
        cls,
        index_dir: str | os.PathLike,
        *,
        settings: InferenceSettings | None = None,
        device: str = UNSET,
        top_k: int = UNSET,
        beam: int | str | None = UNSET,
        draft_size: int | None = UNSET,
        max_pixels: int = UNSET,
        ten_crop: bool = UNSET,
        warn_untrained: bool = True,
    ) -> Locator:
        """Load the index's encoder and search engine. The knobs are `settings`' (default:
        `InferenceSettings()`'s defaults: device auto = CUDA when available, top_k 5, the index's
        beam, draft decoding to the encoder's size, ten_crop off), each overridden by the keyword of
        the same name when given. `ten_crop`: embed each image as the normalised mean of its 10
        test-time crops. `batch_size` does not apply: each `locate` call is one batch.
        `warn_untrained`: log `segmenter_warning` when it applies (a caller that says it its own
        way, like `geosurge serve`, passes False and reads `locator.segmenter_note`)."""
        given = {k: v for k, v in dict(device=device, top_k=top_k, beam=beam, draft_size=draft_size,
                                       max_pixels=max_pixels, ten_crop=ten_crop).items() if v is not UNSET}
        s = (settings or InferenceSettings()).inference()
        if given:
            s = s.with_(**given)
        predictor = Predictor.open(index_dir, s.device, SearchSettings(
            s.top_k, s.beam, False, s.ten_crop, galleries=s.galleries, refine_cells=s.refine_cells),
            s.runtime)
        size = predictor.image_size
        places = _read_places(Path(index_dir), predictor.index.levels)
        spec = DecodeSpec(size, size if s.draft_size is None else s.draft_size, s.max_pixels, s.ten_crop)
        note = segmenter_warning(index_dir)
        if note and warn_untrained:
            log.warning("%s", note)  # once per open, in plain words
        locator = cls(predictor, spec, places, segmenter_note=note)
        locator.cap, locator.index_dir = Cap.from_settings(s), Path(index_dir)
        return locator

    @property
    def image_size(self) -> int:
        return self.spec.image_size

    def decode(self, image, class_map=None, *, name: str | None = None, hold=None) -> Decoded:
        """The reader stage for one image (no model; thread-safe, may run in other threads).
        `class_map`: its class map (path, PNG bytes, PIL image or uint8 array of ADE20K ids)."""
        return decode_any(image, self.spec, class_map=class_map, name=name, hold=hold)

    def locate(self, images: Iterable, *, top_k: int | None = None, ids: Sequence[str] | None = None,
               return_embeddings: bool = False, cell_probabilities: bool = True,
               class_maps: Sequence | None = None, cap: Cap | Sequence[Cap | None] | None = None,
               ) -> list[Prediction]:
        """Paths, bytes, PIL images or `Decoded` (from `decode`) -> one Prediction each, in order.
        An image that cannot be decoded gives a Prediction with `error` set, never an exception.
        `class_maps`: one class map per image, or None (a path then uses its `<stem>.classmap.png`
        when it exists; others run the segmenter); an item may also be an `(image, class_map)`
        pair. `cell_probabilities=False` leaves `cells[i].probability` None: each level's softmax
        needs every cell of the level (a GEMM per level), which a caller that ignores them should
        not pay. `cap`: a precision cap (`privacy.Cap`), one for all or one per image, on top of
        the locator's own (`self.cap`, from its settings): the coarser of the two applies, so
        a call can ask for a coarser answer, never a finer one; a capped answer has no embedding."""
        if self.closed:
            raise RuntimeError("this Locator is closed")
        images = list(images)
        if not images:
            return []
        maps = [None] * len(images) if class_maps is None else list(class_maps)
        if len(maps) != len(images):
            raise ValueError(f"{len(maps)} class maps for {len(images)} images")
        for i, im in enumerate(images):
            if isinstance(im, tuple):
                if len(im) != 2 or maps[i] is not None:
                    raise ValueError(f"images[{i}]: a tuple is (image, class_map), and its map not also "
                                     "in class_maps")
                images[i], maps[i] = im
        if ids is None:
            ids = [os.fspath(im) if isinstance(im, (str, os.PathLike)) else None for im in images]
        ids = [None if i is None else str(i) for i in ids]
        if len(ids) != len(images):
            raise ValueError(f"{len(ids)} ids for {len(images)} images")
        decoded = [im if isinstance(im, Decoded) else self.decode(im, cm, name=i or f"images[{n}]")
                   for n, (im, cm, i) in enumerate(zip(images, maps, ids, strict=True))]
        batch = collate(np.arange(len(decoded)), decoded, self.image_size, crops=self.spec.crops)
        base = self.predictor
        with self._lock:
            pred = base if top_k in (None, base.settings.top_k) else Predictor(
                base.encoder, base.index, base.device, replace(base.settings, top_k=top_k, save_embeddings=False),
                confidence=base.confidence)
            table, result, emb = pred.predict_full(batch, [i or "" for i in ids], [i for i in ids])
            level_probs = None
            if result is not None and cell_probabilities:
                level_probs = self.index.engine.level_probabilities(emb, result.best_cells)
        conf = _confidence_columns(table, batch.ok)
        preds = self._predictions(batch, ids, result, level_probs, emb if return_embeddings else None, conf)
        return self._capped(preds, cap)

    def _capped(self, preds: list[Prediction], cap) -> list[Prediction]:
        """`privacy.apply_cap` with the coarser of the locator's cap and the call's (per image)."""
        caps = list(cap) if isinstance(cap, (list, tuple)) else [cap] * len(preds)
        if len(caps) != len(preds):
            raise ValueError(f"{len(caps)} caps for {len(preds)} images")
        caps = [self.cap.coarser(c) if self.cap else c for c in caps]
        if not any(caps):
            return preds
        out = list(preds)
        for c in {c for c in caps if c}:
            sel = [i for i, ci in enumerate(caps) if ci == c]
            for i, p in zip(sel, apply_cap([preds[i] for i in sel], self.index.tree, c,
                                           places=self._places_of), strict=True):
                out[i] = p
        return out

    def _places_of(self, level: int, cell: int) -> dict:
        """Place names of one cell of any level (levels read once, when a cap first needs them)."""
        if level == self.index.tree.levels:
            table = self.places
        else:
            if level not in self._level_places:
                if self.index_dir is None:
                    return dict.fromkeys(PLACE_COLUMNS)
                self._level_places[level] = _read_places(self.index_dir, level)
            table = self._level_places[level]
        return {c: table[c][cell] for c in PLACE_COLUMNS}

    def _predictions(self, batch, ids, result, level_probs, emb, conf=None) -> list[Prediction]:
        tree = self.index.tree
        finest = tree.levels - 1
        out, r = [], 0
        for i in range(len(batch)):
            if not batch.ok[i]:
                out.append(Prediction(None, None, None, [], [], None, None, None, None, None, None,
                                      batch.errors[i], ids[i]))
                continue
            path = result.best_cells[r]
            # Scalar look-ups: converting every level's tokens per call costs more than the search.
            cells = [CellPrediction(lv + 1, int(c), tree.tokens[lv][int(c)].as_py(),
                                   None if level_probs is None else float(level_probs[r, lv]),
                                   conf["level_confidence"][r][lv] if conf else None)
                     for lv, c in enumerate(path)]
            alts = [Alternative(int(c), tree.tokens[finest][int(c)].as_py(), float(p), float(tree.mean_lat[finest][c]),
                                float(tree.mean_lon[finest][c]))
                    for c, p in zip(result.topk_cells[r], result.topk_probs[r], strict=True) if c >= 0]
            best = int(path[-1])
            place = [self.places[c][best] for c in PLACE_COLUMNS]
            out.append(Prediction(
                float(result.lat[r]), float(result.lon[r]), float(result.probability[r]), cells, alts,
                *place, int(batch.width[i]), int(batch.height[i]), None, ids[i],
                emb[r].tolist() if emb is not None else None, **_point_fields(result, r),
                **({k: conf[k][r] for k in ("confidence", "r50_km", "r90_km", "calibrated", *WITHIN_COLUMNS)}
                   if conf else {}),
            ))
            r += 1
        return out


def _confidence_columns(table, ok) -> dict | None:
    """The confidence columns of the predictor's rows (`search.result_to_arrow`), for the rows
    without error, as Python values: the API answers the numbers the Parquet rows hold."""
    if table is None or "confidence" not in table.column_names:
        return None
    keep = np.flatnonzero(np.asarray(ok, dtype=bool))
    from geosurge_index.pred_store import CONFIDENCE_FIELDS

    t = table.select([name for name, _ in CONFIDENCE_FIELDS]).take(keep)
    out = {c: t.column(c).to_pylist() for c in t.column_names}
    return None if any(v is None for v in out["confidence"]) else out


def _point_fields(result, r: int) -> dict:
    """Prediction's point_source .. cell_lon of result row r (see `search.Refinement`)."""
    from geosurge_index.search import POINT_SOURCES

    ref = result.refinement
    if ref is None:
        return {"point_source": POINT_SOURCES[0], "cell_lat": float(result.lat[r]), "cell_lon": float(result.lon[r])}
    sim = float(ref.similarity[r])
    return {"point_source": POINT_SOURCES[int(ref.point_source[r])], "neighbour_gallery": ref.gallery[r],
            "neighbour_id": ref.neighbour_id[r], "neighbour_similarity": None if sim != sim else sim,
            "cell_lat": float(ref.cell_lat[r]), "cell_lon": float(ref.cell_lon[r])}
