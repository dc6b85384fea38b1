"""`geosurge segment INPUT...`: precompute semantic class maps once, beside the images."""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

DESCRIPTION = """\
Compute each image's semantic class map once and store it beside the image as
<stem>.classmap.png (8-bit PNG of ADE20K class ids 0..149, the whole image at the segmenter's
input size on its short side).

Why: segmentation is the costly part of the GeoSURGE encoder (OneFormer Swin-L takes ~8 s per
image on a CPU, far more than CLIP). Training reads every image once per epoch and would run the
segmenter every epoch; `geosurge train` and `geosurge locate` use a stored map instead and skip
the segmenter for that image entirely. So segment a data set once, then train and locate as
often as you like.

INPUT, one or more of (as for `geosurge locate`):
  a folder     every .jpg/.jpeg/.png/.webp under it, recursively (existing class maps excluded)
  a manifest   .csv/.tsv/.parquet with a path column (relative paths are relative to the manifest)
WebDataset shards are not rewritten: add classmap.png members to the samples when you write them.

Images that cannot be used (zero bytes, truncated, not an image, too many pixels, unreadable)
are counted by kind and skipped; the run goes on. Existing maps are kept unless --overwrite, so
an interrupted run continues where it stopped when run again. A map is written to a temporary
and renamed, so a map on disk is always whole.

Pretrained weights are loaded with from_pretrained from a local folder or the Hugging Face cache
(nothing is downloaded at run time).

Examples:
  geosurge segment photos/                                    # OneFormer Swin-L ADE20K
  geosurge segment mp16.parquet --segmenter segformer         # SegFormer-b0 ADE20K, ~25x faster
  geosurge segment photos/ --pretrained /models/oneformer_ade20k_swin_large --device cuda
"""

# The defaults of `model.config` (DEFAULT_ONEFORMER, DEFAULT_SEGFORMER, SegmenterConfig.input_size),
# repeated here because importing the model package imports torch and `geosurge --help` must stay
# fast; a test checks that they agree.
PRETRAINED = {"oneformer": "shi-labs/oneformer_ade20k_swin_large",
              "segformer": "nvidia/segformer-b0-finetuned-ade-512-512"}
DEFAULT_INPUT_SIZE = 512


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "segment",
        help="precompute semantic class maps (<stem>.classmap.png) once, so training and locate skip the segmenter",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", metavar="INPUT", nargs="+", help="folders or manifests (.csv/.tsv/.parquet) of images")
    p.add_argument("--segmenter", choices=sorted(PRETRAINED), default="oneformer",
                   help="which ADE20K segmenter: oneformer (the paper's, Swin-L) or segformer (fast) "
                        "(default: %(default)s)")
    p.add_argument("--pretrained", metavar="PATH_OR_HUB_ID", default=None,
                   help=f"the segmenter's weights: a folder saved with save_pretrained, or a hub id in the "
                        f"Hugging Face cache (default: {PRETRAINED['oneformer']} for oneformer, "
                        f"{PRETRAINED['segformer']} for segformer)")
    p.add_argument("--input-size", type=int, default=DEFAULT_INPUT_SIZE,
                   help="the segmenter runs with the image's short side at this many pixels; the map is "
                        "stored at that size (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute maps that already exist (default: keep them, so reruns resume)")
    p.add_argument("--path-column", default="path", help="manifest column holding image paths (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N (default: %(default)s)")
    p.set_defaults(func=run_segment)


def image_paths(inputs: list[str], path_column: str = "path") -> list[str]:
    """INPUT arguments -> image files, in input order, each once (a map belongs to a file, so the
    ids that `geosurge locate` needs unique do not matter here). Tar shards: UserError."""
    import pyarrow as pa

    from geosurge_index import sources
    from geosurge_index.errors import UserError

    if not inputs:
        raise UserError("no inputs given")
    columns = sources.ManifestColumns(path=path_column)
    tables = []
    for src in inputs:
        kind = sources.input_kind(src)
        if kind == "tar":
            raise UserError(f"input {src} is a WebDataset shard: `geosurge segment` writes maps beside image "
                            "files; give the shard's samples a classmap.png member instead")
        tables.append(sources.read_folder(src) if kind == "folder" else sources.read_manifest(src, columns))
    files = pa.concat_tables(tables).column("file").to_pylist()
    return list(dict.fromkeys(files))


@dataclass
class SegmentSummary:
    images: int = 0
    written: int = 0
    existing: int = 0
    errors: Counter = field(default_factory=Counter)  # kind -> count
    first_error: dict = field(default_factory=dict)  # kind -> "path: message" of its first case

    def line(self) -> str:
        n_err = sum(self.errors.values())
        out = (f"segment: {self.images} images: {self.written} maps written, {self.existing} skipped "
               f"(map exists), {n_err} errors")
        if self.errors:
            out += "\n  errors by kind: " + ", ".join(f"{k} {v}" for k, v in sorted(self.errors.items()))
            out += "".join(f"\n  first {k}: {msg}" for k, msg in sorted(self.first_error.items()))
        return out


def segment_images(paths: list, segmenter, *, overwrite: bool = False) -> SegmentSummary:
    """Write `<stem>.classmap.png` beside each image with `model.classmaps.write_class_maps`, one
    image at a time so that a failure is counted against its image and the run goes on."""
    from geosurge_index.model.classmaps import write_class_maps
    from geosurge_index.progress import bar

    summary = SegmentSummary(images=len(paths))
    with bar(total=len(paths), desc="segment", unit="img") as pbar:
        for p in paths:
            try:
                counts = write_class_maps([p], segmenter, overwrite=overwrite, progress=False)
            except OSError as err:  # the map could not be written (read-only folder, full disk)
                counts = Counter({"write_failed": 1})
                summary.first_error.setdefault("write_failed", f"{p}: {err}")
            except (RuntimeError, ValueError) as err:  # the segmenter failed on this image
                counts = Counter({"segment_failed": 1})
                summary.first_error.setdefault("segment_failed", f"{p}: {type(err).__name__}: {err}")
            summary.written += counts.pop("written", 0)
            summary.existing += counts.pop("existing", 0)
            for kind in counts:
                if kind not in summary.first_error:
                    summary.first_error[kind] = _decode_message(p)
            summary.errors.update(counts)
            pbar.update(1)
            if summary.errors:
                pbar.set_postfix(errors=sum(summary.errors.values()), refresh=False)
    return summary


def _decode_message(path) -> str:
    """The decoder's message for an image write_class_maps counted as bad (it keeps only the kind);
    asked once per kind."""
    from geosurge_index.images import ImageDecodeError, decode_image

    try:
        decode_image(path)
    except ImageDecodeError as err:
        return f"{path}: {err.message}"
    return f"{path}: cannot be decoded"


def build(kind: str, pretrained: str | None, input_size: int, device: str = "auto"):
    """A pretrained segmenter from `from_pretrained` (a folder or the HF cache), on `device`."""
    from geosurge_index.errors import UserError
    from geosurge_index.locate.predictor import resolve_device
    from geosurge_index.model.config import SegmenterConfig
    from geosurge_index.model.segmenter import build_segmenter

    if input_size < 32:
        raise UserError(f"--input-size {input_size}: too small for a segmenter (at least 32)")
    cfg = SegmenterConfig(kind=kind, pretrained=pretrained or PRETRAINED[kind], arch=None, input_size=input_size)
    dev = resolve_device(device)
    return build_segmenter(cfg, None).to(dev)


def run_segment(args: argparse.Namespace) -> int:
    from geosurge_index.errors import UserError

    paths = image_paths(list(args.inputs), args.path_column)
    if not paths:
        raise UserError(f"no images found in {', '.join(map(str, args.inputs))}")
    # Existing maps are counted before the (large) segmenter is loaded: a finished run costs nothing.
    todo = paths if args.overwrite else [p for p in paths if not _has_map(p)]
    summary = SegmentSummary(images=len(paths), existing=len(paths) - len(todo))
    if todo:
        segmenter = build(args.segmenter, args.pretrained, args.input_size, args.device)
        done = segment_images(todo, segmenter, overwrite=args.overwrite)
        summary.written, summary.existing = done.written, summary.existing + done.existing
        summary.errors, summary.first_error = done.errors, done.first_error
    print(summary.line(), file=sys.stderr)
    return 0


def _has_map(path: str | os.PathLike) -> bool:
    from geosurge_index.images import class_map_path

    return class_map_path(path).exists()
