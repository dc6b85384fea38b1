"""`geosurge segment INPUT...`: precompute semantic class maps once, beside the images."""

from __future__ import annotations

import argparse
import sys

DESCRIPTION = """\
Compute each image's semantic class map once and store it beside the image as
<stem>.classmap.png (8-bit PNG of ADE20K class ids 0..149): the map of the centre crop the
backbone sees (--image-size, 336 for CLIP ViT-L/14-336), segmented at the segmenter's input size
(--input-size) and stored at the crop's size. It is the very map the encoder computes on the fly
for an image without one, so a model trained on stored maps sees the same maps in the service.
(Ten-crop, the paper's test protocol, segments each of its ten crops on the fly instead.)

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

Pretrained weights are loaded with from_pretrained from a local folder or the Hugging Face cache:
nothing is downloaded (whatever HF_HUB_OFFLINE says) unless you pass --download. --segmenter small
takes a folder written by the segmenter training as --pretrained (`geosurge demo`'s segmenter/, or
`segmenter_train.train_segmenter`): the small segmenter an index ships, so that a model trains on
the very maps the index computes for photos sent without one (what `geosurge demo` does).

Examples:
  geosurge segment photos/                                    # OneFormer Swin-L ADE20K
  geosurge segment mp16.parquet --segmenter segformer         # SegFormer-b0 ADE20K, ~25x faster
  geosurge segment photos/ --pretrained /models/oneformer_ade20k_swin_large --device cuda
  geosurge segment demo-out/world/train-segmented --segmenter small --pretrained demo-out/segmenter --image-size 64
"""

# The defaults of `model.config` (DEFAULT_ONEFORMER, DEFAULT_SEGFORMER, SEGMENTER_INPUT_SIZE) and
# `model.classmaps.DEFAULT_IMAGE_SIZE`, repeated here because importing the model package imports
# torch and `geosurge --help` must stay fast; a test checks that they agree.
PRETRAINED = {"oneformer": "shi-labs/oneformer_ade20k_swin_large",
              "segformer": "nvidia/segformer-b0-finetuned-ade-512-512"}
INPUT_SIZE = {"oneformer": 640, "segformer": 512}
DEFAULT_IMAGE_SIZE = 336


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "segment",
        help="precompute semantic class maps (<stem>.classmap.png) once, so training and locate skip the segmenter",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", metavar="INPUT", nargs="+", help="folders or manifests (.csv/.tsv/.parquet) of images")
    p.add_argument("--segmenter", choices=[*sorted(PRETRAINED), "small"], default="oneformer",
                   help="which ADE20K segmenter: oneformer (the paper's, Swin-L), segformer (fast), or "
                        "small (a trained small segmenter: give its folder as --pretrained) "
                        "(default: %(default)s)")
    p.add_argument("--pretrained", metavar="PATH_OR_HUB_ID", default=None,
                   help=f"the segmenter's weights: a folder saved with save_pretrained, or a hub id in the "
                        f"Hugging Face cache (default: {PRETRAINED['oneformer']} for oneformer, "
                        f"{PRETRAINED['segformer']} for segformer)")
    p.add_argument("--input-size", type=int, default=None,
                   help="the segmenter runs on the crop resized to this square side (default: the "
                        f"checkpoint's own ADE20K test size: {INPUT_SIZE['oneformer']} for oneformer, "
                        f"{INPUT_SIZE['segformer']} for segformer); use the model's "
                        "[model.segmenter] input_size so stored maps equal on-the-fly ones")
    p.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE,
                   help="side of the crop the backbone sees, at which the map is stored: the encoder's "
                        "input size (`geosurge model-info`; default: %(default)s, CLIP ViT-L/14-336)")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute maps that already exist (default: keep them, so reruns resume)")
    p.add_argument("--path-column", default="path", help="manifest column holding image paths (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--download", action="store_true",
                   help="fetch the segmenter's weights from the Hugging Face hub when they are not in the cache "
                        "(default: local files only, no network)")
    p.set_defaults(func=run_segment)


def run_segment(args: argparse.Namespace) -> int:
    from geosurge_index import sources
    from geosurge_index.errors import UserError
    from geosurge_index.images import class_map_path

    paths = sources.image_files(list(args.inputs), sources.ManifestColumns(path=args.path_column))
    if not paths:
        raise UserError(f"no images found in {', '.join(map(str, args.inputs))}")
    # Existing maps are counted before the (large) segmenter is loaded: a finished run costs nothing.
    todo = paths if args.overwrite else [p for p in paths if not class_map_path(p).exists()]
    if args.segmenter == "small" and not args.pretrained:
        raise UserError("--segmenter small: give the trained segmenter's folder as --pretrained SEG_DIR")
    input_size = args.input_size or INPUT_SIZE.get(args.segmenter)  # small: None, its own
    if input_size is not None and input_size < 32:
        raise UserError(f"--input-size {args.input_size}: too small for a segmenter (at least 32)")
    if args.image_size < 8:
        raise UserError(f"--image-size {args.image_size}: too small (the encoder's input side, e.g. 336)")
    if todo:
        from geosurge_index.model.classmaps import load_segmenter, segment_images

        segmenter = load_segmenter(args.segmenter, args.pretrained or PRETRAINED[args.segmenter], input_size,
                                   args.device, download=args.download)
        try:
            summary = segment_images(todo, segmenter, overwrite=args.overwrite, image_size=args.image_size)
        except KeyboardInterrupt:
            print("geosurge segment: interrupted; the maps written are kept: rerun the same command to resume",
                  file=sys.stderr)
            return 130
        summary.images, summary.existing = len(paths), summary.existing + len(paths) - len(todo)
    else:
        from geosurge_index.model.classmaps import SegmentSummary

        summary = SegmentSummary(images=len(paths), existing=len(paths))
    print(summary.line(), file=sys.stderr)
    return 0

