"""The reader stage: input rows, paths, bytes or PIL images -> model-size uint8 pixels and class
maps (`DecodedBatch`). Pure CPU; runs in DataLoader worker processes or Ray tasks. One centre crop
per image, or with `ten_crop` the 10 test-time crops. Failures become error strings, never exceptions.

A class map (ADE20K ids, 255 unlabelled: the `<stem>.classmap.png` format) comes from beside a
path, from a tar sample, or from the caller (`decode_any(..., class_map=...)`: a path, PNG bytes,
a PIL image or a uint8 array), and is cut with its image's crop plan."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from PIL import Image

from geosurge_index import geometry, sources
from geosurge_index.exif_gps import TAGGED_ERROR, GpsTag, read_gps
from geosurge_index.geometry import TEN_CROPS  # test-time ten-crop: 4 corners + centre, and their mirrors
from geosurge_index.images import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    PixelHold,
    decode_image_with_size,
    open_class_map,
)
from geosurge_index.sources import DEFAULT_MAX_BYTES


@dataclass(frozen=True)
class DecodeSpec:
    """How images become model inputs. `draft_size` 0 decodes JPEGs at full size. `ten_crop`:
    each image becomes the 10 test-time crops (`geometry.ten_crop`) instead of one."""

    image_size: int
    draft_size: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    ten_crop: bool = False
    max_bytes: int = DEFAULT_MAX_BYTES  # the most bytes read of one input (`sources.read_bytes`)
    skip_tagged: bool = False  # a photo with valid EXIF GPS is not decoded: an error row of kind skipped_tagged

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
    gps: GpsTag | None = None  # the photo's own EXIF GPS (`exif_gps.read_gps`)


def class_map_image(source, name: str | None = None) -> Image.Image:
    """A class map given by a caller -> an 8-bit PIL image: a path or PNG bytes (as
    `<stem>.classmap.png`), a PIL image (mode L or P) or a 2-D integer array of ADE20K ids."""
    what = name or "the class map"
    if isinstance(source, Image.Image):
        if source.mode not in ("L", "P"):
            raise ImageDecodeError("bad_class_map", f"{what}: class maps are 8-bit single-channel images, "
                                   f"not mode {source.mode}")
        return source
    if isinstance(source, np.ndarray):
        if source.ndim != 2 or not np.issubdtype(source.dtype, np.integer):
            raise ImageDecodeError("bad_class_map", f"{what}: a class map array is 2-D integer ADE20K ids, "
                                   f"not {source.dtype} {source.shape}")
        if source.size and (source.min() < 0 or source.max() > 255):
            raise ImageDecodeError("bad_class_map", f"{what}: class ids must lie in 0..255")
        return Image.fromarray(source.astype(np.uint8, copy=False), "L")
    if isinstance(source, (bytes, bytearray, memoryview)):
        if not source:
            raise ImageDecodeError("bad_class_map", f"{what} is empty")
        import io

        buf = io.BytesIO(bytes(source))
        buf.name = what
        try:
            return open_class_map(buf)
        except (OSError, SyntaxError, ValueError) as err:  # ImageDecodeError is a ValueError too
            if isinstance(err, ImageDecodeError):
                raise
            raise ImageDecodeError("bad_class_map", f"{what} is not a readable PNG class map") from err
    return open_class_map(source)  # a path: as bulk locate reads the maps beside its images


def _decode(image_source, cmap_source, spec: DecodeSpec, name: str | None = None,
            hold: PixelHold | None = None) -> Decoded:
    """Bytes or a PIL image -> Decoded, with the photo's EXIF GPS. Never raises on bad data."""
    gps = read_gps(image_source)
    if spec.skip_tagged and gps.valid:
        return Decoded(None, None, error=f"{TAGGED_ERROR}: the photo carries EXIF GPS ({gps.lat:.6f}, "
                       f"{gps.lon:.6f}); --skip-tagged leaves it to its own coordinates", gps=gps)
    decoded = _decode_pixels(image_source, cmap_source, spec, name, hold)
    decoded.gps = gps
    return decoded


def _decode_pixels(image_source, cmap_source, spec: DecodeSpec, name: str | None = None,
                   hold: PixelHold | None = None) -> Decoded:
    """Bytes or a PIL image -> Decoded. Never raises on bad data: failures become `error`."""
    try:
        sized = decode_image_with_size(image_source, max_pixels=spec.max_pixels,
                                       draft_size=spec.draft_size or None, name=name, hold=hold)
        # One crop plan for the pixels and the class map: the map is cut exactly like its image.
        plan = geometry.crop_plan(*sized.image.size, spec.image_size, ten=spec.ten_crop)
        pixels = plan.cut_pixels(sized.image)
        cmap_name = f"the class map of {name}" if name else None
        cmap = None if cmap_source is None else plan.cut_class_map(class_map_image(cmap_source, cmap_name))
        if not spec.ten_crop:
            pixels, cmap = pixels[0], None if cmap is None else cmap[0]
        return Decoded(pixels, cmap, sized.width, sized.height)
    except ImageDecodeError as err:
        return Decoded(None, None, error=f"{err.kind}: {err.message}")
    except Exception as err:  # noqa: BLE001 - a bulk run never dies on one odd file
        return Decoded(None, None, error=f"decode_failed: {type(err).__name__}: {err}")


# Test hook: a decoding process that reads the file named by this variable (its basename) kills
# itself with SIGKILL, as a segfault or the OOM killer would: how the tests reach a DataLoader
# worker, whatever its start method. Never set outside the tests.
KILL_ENV = "GEOSURGE_TEST_KILL_DECODER_ON"


def _test_kill() -> None:
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


_BESIDE = object()  # decode_input_row's default: the class map the input table points at


def decode_input_row(file: str, offset: int, size: int, cmo: int, cms: int, spec: DecodeSpec,
                     class_map=_BESIDE) -> Decoded:
    """One row of the input table (`sources.INPUT_SCHEMA`) -> Decoded. `class_map`, when given,
    replaces the row's own (the file beside it or the tar member)."""
    kill_on = os.environ.get(KILL_ENV)
    if kill_on and os.path.basename(file) == kill_on:
        _test_kill()
    try:
        data = sources.read_bytes(file, offset, size, spec.max_bytes)
        cmap = sources.class_map_source(file, offset, cmo, cms) if class_map is _BESIDE else class_map
    except ImageDecodeError as err:
        return Decoded(None, None, error=f"{err.kind}: {err.message}")
    except Exception as err:  # noqa: BLE001 - e.g. a NUL in a manifest path: an error row, not a dead run
        return Decoded(None, None, error=f"unreadable: {file}: {type(err).__name__}: {err}")
    return _decode(data, cmap, spec, name=file)


def decode_any(image, spec: DecodeSpec, *, class_map=None, name: str | None = None,
               hold: PixelHold | None = None) -> Decoded:
    """A path, bytes or PIL image (the `Locator` API) -> Decoded. `class_map`: the image's class
    map (path, PNG bytes, PIL image or array; see `class_map_image`); without one a path's
    `<stem>.classmap.png` is used when it exists. `name` is what error messages call the image
    (a path names itself). `hold`: a pixel budget around the decoding (the service's)."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if hold is None and class_map is None:
            return decode_input_row(path, -1, -1, -1, -1, spec)  # class map beside it too
        try:
            data = sources.read_bytes(path, -1, -1, spec.max_bytes)
        except ImageDecodeError as err:
            return Decoded(None, None, error=f"{err.kind}: {err.message}")
        if class_map is None:
            class_map = sources.class_map_source(path, -1, -1, -1)
        return _decode(data, class_map, spec, name=path, hold=hold)
    if isinstance(image, (bytearray, memoryview)):
        image = bytes(image)
    return _decode(image, class_map, spec, name=name, hold=hold)


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
    gps: list | None = None  # (n,) GpsTag | None: each photo's EXIF GPS

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
        gps=[d.gps for d in decoded],
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


def decode_rows_isolated(table: pa.Table, rows: np.ndarray, spec: DecodeSpec, as_torch: bool = True,
                         context=None) -> DecodedBatch:
    """`decode_rows` in a separate process that decodes one image at a time: an input that kills
    its decoder (a segfault in a codec, the OOM killer) becomes a `worker_crashed` error row, and
    a fresh process goes on with the next one. What the runner does with the batches a dead
    DataLoader worker may have held. `context`: a multiprocessing context (default: fork where
    there is one, else spawn)."""
    import multiprocessing as mp
    import signal

    ctx = context or mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    part = table.take(pa.array(rows)).select(["file", "offset", "size", "cmap_offset", "cmap_size"])
    items = list(zip(*(part.column(i).to_pylist() for i in range(5)), strict=True))
    out: list[Decoded | None] = [None] * len(items)
    start = 0
    while start < len(items):
        recv, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_decode_items, args=(send, items[start:], spec), daemon=True)
        proc.start()
        send.close()
        got = start
        try:
            while got < len(items):
                out[got] = recv.recv()
                got += 1
        except EOFError:  # the process died before sending item `got`
            pass
        finally:
            recv.close()
            proc.join()
        if got < len(items):
            code = proc.exitcode
            how = (f"killed by {signal.Signals(-code).name}" if code is not None and code < 0
                   else f"exit status {code}")
            out[got] = Decoded(None, None, error=f"worker_crashed: {items[got][0]}: the decoding process died "
                               f"({how}) on this input")
            got += 1
        start = got
    return collate(rows, out, spec.image_size, as_torch, spec.crops)


def _decode_items(conn, items, spec: DecodeSpec) -> None:
    try:
        for vals in items:
            conn.send(decode_input_row(*vals, spec))
    finally:
        conn.close()
