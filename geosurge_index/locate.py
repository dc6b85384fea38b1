"""Images -> predictions: the `Locator` API and the bulk runner.

The bulk runner is four swappable stages, the same on one machine and on Ray
(`distributed.py`):

  reader   `decode_rows`: input-table rows -> `DecodedBatch` (uint8 pixels at the model's size,
           class maps, sizes, error strings). Pure CPU; runs in DataLoader worker processes
           (or Ray tasks). One centre crop per image, or with `ten_crop` the 10 test-time crops.
  encoder  `Predictor.encode`: uint8 pixels -> L2-normalised embeddings, normalisation on the
           device, bf16 autocast + pinned, non-blocking copies on CUDA; backbone and segmenter
           once per image (precomputed class maps skip the segmenter); with `ten_crop` the
           normalised mean of the 10 crops' embeddings.
  search   `Predictor.predict`: embeddings -> the index's beam search -> PRED_DIR rows, with an
           error row for every input that could not be decoded.
  writer   `ChunkAssembler` + `pred_store.PredStore`: rows -> one atomic shard per chunk.

`Locator` runs the same reader, encoder and search on images given in memory.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa

from geosurge_index import sources
from geosurge_index.errors import UserError
from geosurge_index.images import (
    CLIP_MEAN,
    CLIP_STD,
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    Preprocess,
    decode_image_with_size,
    load_class_map,
    open_class_map,
)
from geosurge_index.pred_store import (
    PredStore,
    RunConfig,
    chunk_bounds,
    index_identity,
)

# ---------------------------------------------------------------------------------------------
# Reader stage
# ---------------------------------------------------------------------------------------------


TEN_CROPS = 10  # test-time ten-crop: 4 corners + centre, and their mirrors


@dataclass(frozen=True)
class DecodeSpec:
    """How images become model inputs. `draft_size` 0 decodes JPEGs at full size. `ten_crop`:
    each image becomes the 10 test-time crops (`Preprocess.ten_crop_pixels`) instead of one."""

    image_size: int
    draft_size: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    ten_crop: bool = False

    @property
    def crops(self) -> int:
        return TEN_CROPS if self.ten_crop else 1


@dataclass
class Decoded:
    """One image, ready for the model, or the reason it is not."""

    pixels: np.ndarray | None  # uint8 (S, S, 3) resized and centre-cropped; ten-crop: (10, S, S, 3)
    class_map: np.ndarray | None  # uint8 (S, S) ADE20K ids, 255 unlabelled (ten-crop: (10, S, S));
    #                               None: run the segmenter
    width: int = 0  # the photo's size as seen (EXIF rotation applied, before draft scaling); 0 on error
    height: int = 0
    error: str | None = None  # "kind: message"


def _decode(image_source, cmap_source, spec: DecodeSpec) -> Decoded:
    """Bytes or a PIL image -> Decoded. Never raises on bad data: failures become `error`."""
    try:
        sized = decode_image_with_size(image_source, max_pixels=spec.max_pixels,
                                       draft_size=spec.draft_size or None)
        pre = Preprocess(spec.image_size)
        if spec.ten_crop:
            pixels = pre.ten_crop_pixels(sized.image)
        else:
            pixels = np.asarray(pre.resize_crop(sized.image), dtype=np.uint8)
        cmap = None
        if cmap_source is not None:
            if spec.ten_crop:
                from geosurge_index.model.inference import ten_crop_class_maps

                cmap = ten_crop_class_maps(open_class_map(cmap_source), spec.image_size).astype(np.uint8)
            else:
                cmap = load_class_map(cmap_source, spec.image_size).astype(np.uint8)
        return Decoded(pixels, cmap, sized.width, sized.height)
    except ImageDecodeError as err:
        return Decoded(None, None, error=f"{err.kind}: {err.message}")
    except Exception as err:  # noqa: BLE001 - a bulk run never dies on one odd file
        return Decoded(None, None, error=f"decode_failed: {type(err).__name__}: {err}")


def decode_input_row(file: str, offset: int, size: int, cmo: int, cms: int, spec: DecodeSpec) -> Decoded:
    """One row of the input table (`sources.INPUT_SCHEMA`) -> Decoded."""
    try:
        data = sources.read_bytes(file, offset, size)
        cmap = sources.class_map_source(file, offset, cmo, cms)
    except ImageDecodeError as err:
        return Decoded(None, None, error=f"{err.kind}: {err.message}")
    except Exception as err:  # noqa: BLE001 - e.g. a NUL in a manifest path: an error row, not a dead run
        return Decoded(None, None, error=f"unreadable: {file}: {type(err).__name__}: {err}")
    return _decode(data, cmap, spec)


def decode_any(image, spec: DecodeSpec) -> Decoded:
    """A path, bytes or PIL image (the `Locator` API) -> Decoded; a path's class map is used."""
    if isinstance(image, (str, os.PathLike)):
        return decode_input_row(os.fspath(image), -1, -1, -1, -1, spec)  # class map beside it too
    if isinstance(image, (bytearray, memoryview)):
        image = bytes(image)
    return _decode(image, None, spec)


@dataclass
class DecodedBatch:
    """A batch between the reader and the encoder. Rows are in input order."""

    rows: np.ndarray  # int64 (n,) global input-row numbers (or 0..n-1 for Locator)
    ok: np.ndarray  # bool (n,): decoded fine
    pixels: object  # uint8 (n_ok, S, S, 3), a torch tensor (pinnable) or numpy
    class_maps: object  # uint8 (n_ok, S, S); meaningful where has_map
    has_map: np.ndarray  # bool (n_ok,)
    width: np.ndarray  # int32 (n,)
    height: np.ndarray  # int32 (n,)
    errors: list  # (n,) str | None

    def __len__(self) -> int:
        return len(self.rows)

    def pin_memory(self) -> DecodedBatch:  # called by the DataLoader's pinning thread
        self.pixels = self.pixels.pin_memory()
        self.class_maps = self.class_maps.pin_memory()
        return self


def collate(rows: Sequence[int], decoded: Sequence[Decoded], image_size: int, as_torch: bool = True,
            crops: int = 1) -> DecodedBatch:
    """Decoded images -> one batch; `crops` 10 for ten-crop (pixels (n_ok, 10, S, S, 3))."""
    ok = np.array([d.error is None for d in decoded], dtype=bool)
    good = [d for d in decoded if d.error is None]
    s = image_size
    lead = (crops,) if crops > 1 else ()
    pixels = np.stack([d.pixels for d in good]) if good else np.zeros((0, *lead, s, s, 3), np.uint8)
    has_map = np.array([d.class_map is not None for d in good], dtype=bool)
    maps = np.full((len(good), *lead, s, s), 255, dtype=np.uint8)
    for i, d in enumerate(good):
        if d.class_map is not None:
            maps[i] = d.class_map
    if as_torch:
        import torch

        pixels, maps = torch.from_numpy(pixels), torch.from_numpy(maps)
    return DecodedBatch(
        rows=np.asarray(rows, dtype=np.int64),
        ok=ok,
        pixels=pixels,
        class_maps=maps,
        has_map=has_map,
        width=np.array([d.width for d in decoded], dtype=np.int32),
        height=np.array([d.height for d in decoded], dtype=np.int32),
        errors=[d.error for d in decoded],
    )


def decode_rows(table: pa.Table, rows: np.ndarray, spec: DecodeSpec, as_torch: bool = True) -> DecodedBatch:
    """Rows `rows` of the input table -> a DecodedBatch (the reader stage, for one batch)."""
    part = table.take(pa.array(rows)).select(["file", "offset", "size", "cmap_offset", "cmap_size"])
    cols = [part.column(i).to_pylist() for i in range(5)]
    decoded = [decode_input_row(*vals, spec) for vals in zip(*cols, strict=True)]
    return collate(rows, decoded, spec.image_size, as_torch, spec.crops)


class InputDataset:
    """The reader stage as a torch map-style dataset: item i = one batch of pending rows, so that
    a DataLoader worker decodes a whole batch and the main process receives it collated."""

    def __init__(self, table: pa.Table, batches: list[np.ndarray], spec: DecodeSpec):
        self.table, self.batches, self.spec = table, batches, spec

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> DecodedBatch:
        return decode_rows(self.table, self.batches[i], self.spec)


def _worker_init(_):
    import torch

    torch.set_num_threads(1)  # workers only decode; the model owns the other threads


# ---------------------------------------------------------------------------------------------
# Encoder + search stages
# ---------------------------------------------------------------------------------------------


def resolve_device(device: str = "auto"):
    """'auto' | 'cpu' | 'cuda[:N]' -> torch.device (the index's rules: UserError without CUDA)."""
    import torch

    from geosurge_index.index import resolve_device as resolve

    return torch.device(resolve(device))


@dataclass(frozen=True)
class SearchSettings:
    top_k: int = 5
    beam: int | str | None = None  # None: the index's default; "4,4,8,8,8,8": one per level
    save_embeddings: bool = False
    ten_crop: bool = False  # pixels come as 10 crops per image; the embedding is their normalised mean


class Predictor:
    """Encoder + index on one device: DecodedBatch -> PRED_DIR rows (a pyarrow Table)."""

    def __init__(self, encoder, index, device, settings: SearchSettings = SearchSettings()):
        import torch

        self.encoder = encoder.eval()
        self.index = index
        self.device = device
        self.settings = settings
        self.image_size = int(encoder.image_size)
        self._mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)

    @classmethod
    def open(cls, index_dir, device="auto", settings: SearchSettings = SearchSettings()) -> Predictor:
        from geosurge_index.index import GeoIndex
        from geosurge_index.model import load_encoder

        dev = resolve_device(device)
        index = GeoIndex.open(index_dir, device=str(dev))
        if not index.has_encoder:
            raise UserError(f"INDEX_DIR {index_dir} was exported without a visual encoder: it can search "
                            "stored embeddings (`geosurge search`) but cannot locate images")
        return cls(load_encoder(index_dir, dev), index, dev, settings)

    def encode(self, pixels, class_maps, has_map: np.ndarray) -> np.ndarray:
        """uint8 (n, S, S, 3) + class maps (n, S, S) -> float32 (n, D) embeddings. With
        `settings.ten_crop`: uint8 (n, 10, S, S, 3) + maps (n, 10, S, S) -> the L2-normalised
        mean of each image's 10 crop embeddings (`model.embed_ten_crop`)."""
        import torch

        from geosurge_index.model.inference import embed_ten_crop

        n = pixels.shape[0]
        s = self.image_size
        crops = TEN_CROPS if self.settings.ten_crop else 1
        want = (crops, s, s, 3) if crops > 1 else (s, s, 3)
        if tuple(pixels.shape[1:]) != want:
            raise ValueError(f"pixels are {tuple(pixels.shape)}, the encoder takes (n, {', '.join(map(str, want))})")
        cuda = self.device.type == "cuda"
        # uint8 crosses to the device (4x less than float32; non-blocking from pinned memory),
        # normalisation runs there.
        pixels = torch.as_tensor(pixels).to(self.device, non_blocking=cuda)
        has = torch.as_tensor(np.asarray(has_map, dtype=bool))
        maps = torch.as_tensor(class_maps).to(self.device, non_blocking=cuda) if bool(has.any()) else None
        x = pixels.reshape(n * crops, s, s, 3).permute(0, 3, 1, 2).float()
        x = x.div_(255.0).sub_(self._mean).div_(self._std)
        if crops > 1:
            x = x.view(n, crops, 3, s, s)
            encoder = partial(embed_ten_crop, self.encoder)
        else:
            encoder = self.encoder
        out = None
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cuda):
            # Images with a precomputed class map skip the segmenter; the others run it once.
            for with_map in (True, False):
                sel = torch.nonzero(has == with_map).flatten()
                if len(sel) == 0:
                    continue
                idx = sel.to(self.device)
                whole = len(sel) == n  # the usual case: no gather copy
                cmap = (maps if whole else maps.index_select(0, idx)).long() if with_map else None
                emb = encoder(x if whole else x.index_select(0, idx), cmap).float()
                if out is None:
                    out = torch.empty((n, emb.shape[1]), dtype=torch.float32, device=self.device)
                out[idx] = emb
        if out is None:
            return np.zeros((0, 0), np.float32)
        return out.cpu().numpy()

    def predict(self, batch: DecodedBatch, ids, paths) -> pa.Table:
        """The encoder and search stages for one batch: PRED_DIR rows, error rows included."""
        return self.predict_full(batch, ids, paths)[0]

    def predict_full(self, batch: DecodedBatch, ids, paths):
        """-> (PRED_DIR rows, SearchResult of the decoded rows or None, their embeddings or None)."""
        from geosurge_index.search import result_to_arrow

        emb = result = None
        if batch.ok.any():
            emb = self.encode(batch.pixels, batch.class_maps, batch.has_map)
            kwargs = {} if self.settings.beam is None else {"beam": self.settings.beam}
            result = self.index.search(emb, top_k=self.settings.top_k, **kwargs)
        saved = None
        if self.settings.save_embeddings:  # the column exists even when every input failed
            saved = emb if emb is not None else np.zeros((0, self.embed_dim), np.float32)
        ok = batch.ok
        table = result_to_arrow(
            result, self.index.tree, ids, paths, batch.errors, saved,
            widths=[int(w) if o else None for w, o in zip(batch.width, ok, strict=True)],
            heights=[int(h) if o else None for h, o in zip(batch.height, ok, strict=True)],
        )
        return table, result, emb

    @property
    def embed_dim(self) -> int:
        return int(getattr(self.encoder, "embed_dim", 768))


# ---------------------------------------------------------------------------------------------
# Writer stage
# ---------------------------------------------------------------------------------------------


class ChunkAssembler:
    """Collects prediction rows (any order, any batching) and writes each chunk once it is whole."""

    def __init__(self, store: PredStore, config: RunConfig, row_column: str = "_row"):
        self.store, self.config = store, config
        self.parts: dict[int, list[tuple[np.ndarray, pa.Table]]] = {}
        self.counts: Counter = Counter()
        self.written = 0

    def add(self, rows: np.ndarray, table: pa.Table) -> int:
        """Add rows (global row numbers + their predictions); return the chunks written."""
        cs = self.config.chunk_size
        chunks = rows // cs
        done = 0
        for c in np.unique(chunks):
            sel = np.flatnonzero(chunks == c)
            self.parts.setdefault(int(c), []).append((rows[sel], table.take(pa.array(sel))))
            self.counts[int(c)] += len(sel)
            start, stop = chunk_bounds(int(c), cs, self.config.n_inputs)
            if self.counts[int(c)] == stop - start:
                self._write(int(c), start, stop)
                done += 1
        return done

    def _write(self, c: int, start: int, stop: int) -> None:
        parts = self.parts.pop(c)
        del self.counts[c]
        rows = np.concatenate([r for r, _ in parts])
        table = pa.concat_tables([t for _, t in parts])
        order = np.argsort(rows, kind="stable")
        if not np.array_equal(rows[order], np.arange(start, stop)):
            raise RuntimeError(f"chunk {c}: rows are not exactly {start}..{stop - 1} (duplicates or gaps)")
        self.store.write_chunk(c, table.take(pa.array(order)))
        self.written += 1

    @property
    def pending(self) -> int:
        return len(self.parts)


# ---------------------------------------------------------------------------------------------
# The bulk job
# ---------------------------------------------------------------------------------------------


@dataclass
class LocateJob:
    """Everything `geosurge locate` needs; one object shared by the local and the Ray runner."""

    index_dir: str
    inputs: list[str]
    out_dir: str
    columns: sources.ManifestColumns = field(default_factory=sources.ManifestColumns)
    top_k: int = 5
    beam: int | str | None = None
    save_embeddings: bool = False
    chunk_size: int = 1024
    batch_size: int | None = None  # None: 256 on CUDA, 32 on CPU
    workers: int | None = None  # decoding processes; None: `default_workers`; 0: in-process
    device: str = "auto"
    draft_size: int | None = None  # None: the encoder's input size; 0: off
    max_pixels: int = DEFAULT_MAX_PIXELS
    ten_crop: bool = False  # test-time ten-crop averaging (10x the encoder work)

    def settings(self) -> SearchSettings:
        return SearchSettings(self.top_k, self.beam, self.save_embeddings, self.ten_crop)

    def output_settings(self) -> dict:
        """The settings that change the rows: a resume must keep them."""
        out = {"top_k": self.top_k, "beam": self.beam, "save_embeddings": self.save_embeddings,
               "draft_size": self.draft_size, "max_pixels": self.max_pixels,
               "path_column": self.columns.path, "id_column": self.columns.id}
        if self.ten_crop:  # recorded only when on, so that runs from before the setting still resume
            out["ten_crop"] = True
        return out


@dataclass
class Plan:
    """The enumerated inputs, the ledger and what is left to do."""

    job: LocateJob
    table: pa.Table
    config: RunConfig
    store: PredStore
    done: set[int]

    @property
    def pending_chunks(self) -> list[int]:
        return [c for c in range(self.config.n_chunks) if c not in self.done]

    def pending_rows(self) -> np.ndarray:
        cs, n = self.config.chunk_size, self.config.n_inputs
        parts = [np.arange(*chunk_bounds(c, cs, n)) for c in self.pending_chunks]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def plan_job(job: LocateJob) -> Plan:
    """Check everything that can be checked before any work: inputs, ids, index, the ledger."""
    if job.chunk_size < 1 or job.top_k < 1:
        raise UserError("--chunk-size and --top-k must be at least 1")
    index_dir = Path(job.index_dir)
    if not index_dir.is_dir():
        raise UserError(f"INDEX_DIR {index_dir} is not a folder")
    table = sources.enumerate_inputs(job.inputs, job.columns)
    if table.num_rows == 0:
        raise UserError(f"no images found in {', '.join(map(str, job.inputs))}")
    config = RunConfig(
        inputs=[str(Path(p).resolve()) for p in job.inputs],
        n_inputs=table.num_rows,
        fingerprint=sources.fingerprint(table),
        chunk_size=job.chunk_size,
        index_dir=str(index_dir.resolve()),
        index_id=index_identity(index_dir),
        settings=job.output_settings(),
    )
    store = PredStore(job.out_dir)
    done = store.begin(config)
    return Plan(job, table, config, store, done)


@dataclass
class RunStats:
    processed: int = 0  # rows predicted by this invocation
    errors: Counter = field(default_factory=Counter)  # this invocation's error kinds
    started: float = field(default_factory=time.perf_counter)

    def add(self, table: pa.Table) -> None:
        self.processed += table.num_rows
        for e in table.column("error").to_pylist():
            if e is not None:
                self.errors[e.split(":", 1)[0]] += 1


def batches_of(rows: np.ndarray, batch_size: int, chunk_size: int) -> list[np.ndarray]:
    """Cut pending rows into batches that never span two chunks, so chunks finish in order."""
    if len(rows) == 0:
        return []
    cuts = np.flatnonzero(np.diff(rows // chunk_size)) + 1
    out = []
    for part in np.split(rows, cuts):
        out.extend(np.array_split(part, -(-len(part) // batch_size)))
    return out


def default_batch_size(cuda: bool, ten_crop: bool = False) -> int:
    """Images per model call: 256 on CUDA, 32 on the CPU; with ten-crop 8x fewer (each image is
    10 crops through the encoder)."""
    return (256 if cuda else 32) // (8 if ten_crop else 1)


def default_workers(cuda: bool) -> int:
    """Decoding processes: on CUDA enough to feed the GPU (all cores but one, at most 16); on the
    CPU a quarter of the cores (at least 1), the model's threads taking the rest."""
    cores = os.cpu_count() or 1
    return max(1, min(16, cores - 1)) if cuda else max(1, cores // 4)


def run_local(plan: Plan, predictor: Predictor | None = None, progress=None) -> RunStats:
    """The job on this machine: DataLoader decoding workers -> predictor -> shards."""
    import torch

    job = plan.job
    if predictor is None:
        predictor = Predictor.open(job.index_dir, job.device, job.settings())
    cuda = predictor.device.type == "cuda"
    workers = default_workers(cuda) if job.workers is None else job.workers
    threads = torch.get_num_threads()
    if not cuda:
        # Decoding processes and torch's threads share the cores: oversubscribed, torch's OpenMP
        # threads spin against the decoders and a run gets ~10x slower (measured on 2 cores).
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) - workers)))
    try:
        return _run_local(plan, predictor, progress, cuda, workers)
    finally:
        torch.set_num_threads(threads)


def _run_local(plan: Plan, predictor: Predictor, progress, cuda: bool, workers: int) -> RunStats:
    import torch

    job = plan.job
    if predictor.settings.ten_crop != job.ten_crop:
        raise ValueError("the predictor's ten_crop setting differs from the job's")
    batch_size = job.batch_size or default_batch_size(cuda, job.ten_crop)
    size = predictor.image_size
    spec = DecodeSpec(size, size if job.draft_size is None else job.draft_size, job.max_pixels, job.ten_crop)
    batches = batches_of(plan.pending_rows(), batch_size, plan.config.chunk_size)
    dataset = InputDataset(plan.table, batches, spec)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,  # items are batches already
        shuffle=False,
        num_workers=workers,
        pin_memory=cuda,
        prefetch_factor=4 if workers else None,
        worker_init_fn=_worker_init if workers else None,
        persistent_workers=False,
    )
    id_col, path_col = plan.table.column("id"), plan.table.column("path")
    assembler = ChunkAssembler(plan.store, plan.config)
    stats = RunStats()
    for batch in loader:
        rows_arr = pa.array(batch.rows)
        table = predictor.predict(batch, id_col.take(rows_arr).to_pylist(), path_col.take(rows_arr).to_pylist())
        assembler.add(batch.rows, table)
        stats.add(table)
        if progress is not None:
            progress.update(len(batch))
            if stats.errors:
                progress.set_postfix(errors=sum(stats.errors.values()), refresh=False)
    if assembler.pending:
        raise RuntimeError(f"{assembler.pending} chunks were left incomplete")
    return stats


def summarize(plan: Plan, stats: RunStats, strategy: str) -> dict:
    """The end-of-run summary (whole PRED_DIR, plus this invocation's throughput)."""
    wall = time.perf_counter() - stats.started
    rows, kinds = plan.store.error_counts()
    return {
        "images": rows,
        "ok": rows - sum(kinds.values()),
        "errors": sum(kinds.values()),
        "errors_by_kind": dict(sorted(kinds.items())),
        "shards": len(plan.store.shard_paths()),
        "this_run": {
            "images": stats.processed,
            "resumed_chunks": len(plan.done),
            "wall_s": round(wall, 3),
            "images_per_s": round(stats.processed / wall, 3) if wall > 0 else None,
            "strategy": strategy,
        },
        "complete": rows == plan.config.n_inputs,
    }


def run_job(job: LocateJob, ray_address: str | None = None, predictor: Predictor | None = None,
            ray_options: dict | None = None) -> dict:
    """Plan, run (locally or on Ray), write `_summary.json`; return the summary."""
    from geosurge_index.progress import bar

    plan = plan_job(job)
    try:
        n_todo = len(plan.pending_rows())
        with bar(total=n_todo, desc="locate", unit="img") as progress:
            if n_todo == 0:
                stats = RunStats()
            elif ray_address is not None:
                from geosurge_index.distributed import run_ray

                stats = run_ray(plan, ray_address, progress=progress, **(ray_options or {}))
            else:
                stats = run_local(plan, predictor, progress=progress)
        summary = summarize(plan, stats, "ray" if ray_address is not None else "local")
        if summary["complete"]:
            plan.store.finish(summary)
    finally:
        plan.store.release()
    return summary


# ---------------------------------------------------------------------------------------------
# The Python API
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellPrediction:
    """The best cell at one level (the ancestors of the best finest cell)."""

    level: int
    cell_index: int
    s2_token: str
    probability: float  # the level's softmax over all its cells, at this cell


@dataclass(frozen=True)
class Alternative:
    """One of the top-k finest cells."""

    cell_index: int
    s2_token: str
    probability: float
    lat: float
    lon: float


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

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


PLACE_COLUMNS = ("country_code", "country_name", "admin1", "town")


def _read_places(index_dir: Path, level: int) -> dict[str, list]:
    """Place-name columns of one level's cells (None everywhere when the index has none)."""
    import duckdb

    from geosurge_index.index import CELLS_DB

    con = duckdb.connect(str(index_dir / CELLS_DB), read_only=True)
    try:
        have = {r[0] for r in con.execute("SELECT column_name FROM information_schema.columns "
                                          "WHERE table_name = 'cells'").fetchall()}
        cols = [c if c in have else f"NULL AS {c}" for c in PLACE_COLUMNS]
        t = con.sql(f"SELECT {', '.join(cols)} FROM cells WHERE level = $level ORDER BY cell_index",
                    params={"level": level}).to_arrow_table()
    finally:
        con.close()
    return {c: t.column(c).to_pylist() for c in PLACE_COLUMNS}


class Locator:
    """`Locator.open(INDEX_DIR)`; `locator.locate([paths | bytes | PIL images]) -> [Prediction]`.

    One model call per `locate` (give it a batch). Safe to call from any one thread at a time,
    and concurrent calls are serialised by a lock, so a server may call it from a worker thread.
    """

    def __init__(self, predictor: Predictor, spec: DecodeSpec, places: dict[str, list] | None = None):
        if predictor.settings.ten_crop != spec.ten_crop:
            raise ValueError("the predictor's and the decode spec's ten_crop settings differ")
        self.predictor = predictor
        self.spec = spec
        self.index = predictor.index
        n_finest = self.index.tree.sizes[-1]
        self.places = places or {c: [None] * n_finest for c in PLACE_COLUMNS}
        self._lock = threading.Lock()

    @classmethod
    def open(
        cls,
        index_dir: str | os.PathLike,
        *,
        device: str = "auto",
        top_k: int = 5,
        beam: int | str | None = None,
        draft_size: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        ten_crop: bool = False,
    ) -> Locator:
        """Load the index's encoder and search engine on `device` (auto: CUDA when available).
        `ten_crop`: embed each image as the normalised mean of its 10 test-time crops."""
        predictor = Predictor.open(index_dir, device, SearchSettings(top_k, beam, False, ten_crop))
        size = predictor.image_size
        places = _read_places(Path(index_dir), predictor.index.levels)
        spec = DecodeSpec(size, size if draft_size is None else draft_size, max_pixels, ten_crop)
        return cls(predictor, spec, places)

    @property
    def image_size(self) -> int:
        return self.predictor.image_size

    def decode(self, image) -> Decoded:
        """The reader stage for one image (no model; thread-safe, may run in other threads)."""
        return decode_any(image, self.spec)

    def locate(self, images: Iterable, *, top_k: int | None = None, ids: Sequence[str] | None = None,
               return_embeddings: bool = False) -> list[Prediction]:
        """Paths, bytes, PIL images or `Decoded` (from `decode`) -> one Prediction each, in order.
        An image that cannot be decoded gives a Prediction with `error` set, never an exception."""
        images = list(images)
        if not images:
            return []
        decoded = [im if isinstance(im, Decoded) else self.decode(im) for im in images]
        batch = collate(np.arange(len(decoded)), decoded, self.image_size, crops=self.spec.crops)
        if ids is None:
            ids = [os.fspath(im) if isinstance(im, (str, os.PathLike)) else None for im in images]
        ids = [None if i is None else str(i) for i in ids]
        if len(ids) != len(images):
            raise ValueError(f"{len(ids)} ids for {len(images)} images")
        base = self.predictor
        with self._lock:
            pred = base if top_k in (None, base.settings.top_k) else Predictor(
                base.encoder, base.index, base.device, replace(base.settings, top_k=top_k, save_embeddings=False))
            _, result, emb = pred.predict_full(batch, [i or "" for i in ids], [i for i in ids])
            level_probs = self._level_probabilities(emb, result.best_cells) if result is not None else None
        return self._predictions(batch, ids, result, level_probs, emb if return_embeddings else None)

    def _level_probabilities(self, emb: np.ndarray, best_cells: np.ndarray) -> np.ndarray:
        """(n, L): each level's softmax over all its cells (cosine / temperature) at the best path."""
        import torch

        eng = self.index.engine
        q = torch.from_numpy(np.ascontiguousarray(emb)).to(eng.device)
        q = torch.nn.functional.normalize(q, dim=1)
        out = np.empty(best_cells.shape, dtype=np.float64)
        with torch.inference_mode():
            for lv, vec in enumerate(eng.vectors):
                logits = (q @ vec.T).double() / float(eng.temperatures[lv])
                logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
                idx = torch.as_tensor(best_cells[:, lv], dtype=torch.int64, device=logp.device)
                out[:, lv] = logp.gather(1, idx[:, None])[:, 0].exp().cpu().numpy()
        return out

    def _predictions(self, batch, ids, result, level_probs, emb) -> list[Prediction]:
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
            cells = [CellPrediction(lv + 1, int(c), tree.tokens[lv][int(c)].as_py(), float(level_probs[r, lv]))
                     for lv, c in enumerate(path)]
            alts = [Alternative(int(c), tree.tokens[finest][int(c)].as_py(), float(p), float(tree.mean_lat[finest][c]),
                                float(tree.mean_lon[finest][c]))
                    for c, p in zip(result.topk_cells[r], result.topk_probs[r], strict=True) if c >= 0]
            best = int(path[-1])
            place = [self.places[c][best] for c in PLACE_COLUMNS]
            out.append(Prediction(
                float(result.lat[r]), float(result.lon[r]), float(result.probability[r]), cells, alts,
                *place, int(batch.width[i]), int(batch.height[i]), None, ids[i],
                emb[r].tolist() if emb is not None else None,
            ))
            r += 1
        return out
