"""Training the small segmenter (`model.segmenter.kind = "small"`) on class maps.

Images with ground-truth class maps (`<stem>.classmap.png` beside them, or a tar shard's
`classmap.png` members: any input `geosurge locate` takes) -> a segmenter folder
(`model.encoder_io.save_segmenter`) that `geosurge export --segmenter SEG_DIR` puts into an index,
so that photos located without a class map (bytes, uploads, new photos) get a segmenter that works
on that world. The demo trains one on its world's training split (`geosurge demo`, stage
`segmenter`).

What is trained is what runs: the pixels and maps are those locate's reader stage gives the
encoder (`locate.decode`: the same crop plan and size), the input is normalised as
`Segmenter._segment` normalises it, and the loss is taken on the scores upsampled bilinearly to the
encoder's size, where the arg-max is taken at inference. Cross-entropy over the ADE20K ids present
in the maps (255, unlabelled, ignored), AdamW with a one-cycle schedule, horizontal flips.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from geosurge_index.errors import UserError

IGNORE = 255  # unlabelled pixels in a class map (and the loss's ignore index)


@dataclass(frozen=True)
class SegmenterTrainSettings:
    epochs: int = 6
    batch_size: int = 32
    lr: float = 4e-3
    weight_decay: float = 1e-4
    widths: tuple[int, int, int] = (32, 64, 96)  # see model/small_segmenter.py
    context: bool = True  # the global-context branch (model/small_segmenter.py)
    dilations: tuple[int, ...] = (1, 2, 4)  # the dilated blocks at 1/8 of the input
    class_balance: float = 0.5  # class c's loss weight is proportional to its pixel share ** -class_balance
    input_size: int | None = None  # the segmenter's input side; None: the encoder's image size
    max_images: int | None = None  # train on at most this many (a seeded draw); None: all
    val_fraction: float = 0.05  # held out for the accuracy reported (not trained on)
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1:
            raise UserError(f"segmenter training: epochs and batch_size must be >= 1, got {self.epochs}, "
                            f"{self.batch_size}")
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"segmenter training: val_fraction {self.val_fraction} is not in [0, 1)")


@dataclass
class SegmenterTrainResult:
    out_dir: Path
    labels: list[int]  # the ADE20K ids it predicts
    n_train: int
    n_val: int
    n_without_map: int  # inputs skipped: no class map, or not decodable
    pixel_accuracy: float  # held-out labelled pixels whose arg-max class is right (NaN: no held-out images)
    chance_accuracy: float  # the same for always answering the training maps' commonest class
    mean_iou: float  # over the labels present in the held-out maps
    final_loss: float
    seconds: float
    history: list[float] = field(default_factory=list)  # mean training loss per epoch

    def line(self) -> str:
        return (f"segmenter: {len(self.labels)} classes, {self.n_train} training / {self.n_val} held-out "
                f"images; held-out pixel accuracy {self.pixel_accuracy:.1%} (commonest class "
                f"{self.chance_accuracy:.1%}), mean IoU {self.mean_iou:.2f}; {self.seconds:.0f} s")


def read_labelled(sources: list, image_size: int, *, max_images: int | None = None, seed: int = 0,
                  progress: bool = True) -> tuple[np.ndarray, np.ndarray, int]:
    """-> (uint8 pixels (n, S, S, 3), uint8 class maps (n, S, S), inputs skipped) for the inputs
    that have a class map, cut as locate's reader cuts them. `max_images`: a seeded draw of that
    many inputs (in input order) is read instead of all."""
    from geosurge_index.locate.decode import DecodeSpec, decode_input_row
    from geosurge_index.progress import bar
    from geosurge_index.sources import enumerate_inputs

    table = enumerate_inputs([os.fspath(s) for s in sources])
    rows = np.arange(table.num_rows)
    if max_images is not None and max_images < len(rows):
        rows = np.sort(np.random.default_rng([seed, 7]).choice(rows, max_images, replace=False))
    cols = [table.column(c).to_pylist() for c in ("file", "offset", "size", "cmap_offset", "cmap_size")]
    spec = DecodeSpec(image_size)

    def one(i):
        return decode_input_row(*(c[i] for c in cols), spec)

    # PIL decodes outside the GIL: threads are enough, and nothing is pickled
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        it = pool.map(one, rows.tolist())
        decoded = list(bar(it, total=len(rows), desc="read class maps", unit="img") if progress else it)
    good = [d for d in decoded if d.error is None and d.class_map is not None]
    s = image_size
    pixels = np.stack([d.pixels for d in good]) if good else np.zeros((0, s, s, 3), np.uint8)
    maps = np.stack([d.class_map for d in good]) if good else np.zeros((0, s, s), np.uint8)
    return pixels, maps, len(decoded) - len(good)


def segmenter_input(segmenter, pixels_uint8, device):
    """uint8 (B, S, S, 3) -> the segmenter's input, as `Segmenter._segment` computes it from the
    encoder's CLIP-normalised pixels."""
    import torch.nn.functional as F

    from geosurge_index.geometry import clip_normalise

    x = clip_normalise(pixels_uint8, device) * segmenter.scale + segmenter.shift
    if x.shape[-1] != segmenter.input_size:
        x = F.interpolate(x, size=(segmenter.input_size,) * 2, mode="bilinear", align_corners=False)
    return x


def train_segmenter(sources: list, out_dir: str | os.PathLike, *, image_size: int,
                    settings: SegmenterTrainSettings = SegmenterTrainSettings()) -> SegmenterTrainResult:
    """Train a small segmenter on the class maps of `sources` at the encoder's `image_size` and
    save it to `out_dir` (`model.encoder_io.save_segmenter`)."""
    import torch
    import torch.nn.functional as F

    from geosurge_index.devices import resolve_device
    from geosurge_index.model.config import SegmenterConfig
    from geosurge_index.model.encoder_io import save_segmenter
    from geosurge_index.model.segmenter import build_segmenter
    from geosurge_index.progress import bar

    t0 = time.perf_counter()
    s = settings
    pixels, maps, skipped = read_labelled(sources, image_size, max_images=s.max_images, seed=s.seed,
                                          progress=s.progress)
    n = len(pixels)
    if n < 2:
        raise UserError(f"segmenter training: {n} of the inputs have a class map (<stem>.classmap.png "
                        "beside the image); at least 2 are needed")
    labels = [int(v) for v in np.unique(maps) if v != IGNORE]
    if not labels:
        raise UserError("segmenter training: every class map is unlabelled (255)")
    lut = np.full(256, IGNORE, dtype=np.uint8)  # ADE20K id -> the segmenter's own label index
    lut[labels] = np.arange(len(labels), dtype=np.uint8)

    rng = np.random.default_rng([s.seed, 11])
    order = rng.permutation(n)
    n_val = min(n - 1, round(n * s.val_fraction))
    val_idx, train_idx = np.sort(order[:n_val]), order[n_val:]

    torch.manual_seed(s.seed)
    device = resolve_device(s.device)
    cfg = SegmenterConfig(kind="small", pretrained=None, input_size=int(s.input_size or image_size),
                          arch={"model_type": "small_conv", "widths": [int(w) for w in s.widths],
                                "context": bool(s.context), "dilations": [int(d) for d in s.dilations],
                                "labels": labels})
    segmenter = build_segmenter(cfg, cfg.arch).to(device)
    net = segmenter.model.to(memory_format=torch.channels_last)  # ~1.5x faster convolutions on CPUs
    net.train()
    net.requires_grad_(True)
    steps_per_epoch = math.ceil(len(train_idx) / s.batch_size)
    opt = torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=s.lr, total_steps=s.epochs * steps_per_epoch,
                                                pct_start=0.15)
    targets = torch.from_numpy(lut[maps])  # (n, S, S) uint8 label indices, 255 ignored
    weights = class_weights(lut[maps[train_idx]], len(labels), s.class_balance).to(device)
    history: list[float] = []
    pbar = bar(total=s.epochs * steps_per_epoch, desc="train segmenter", unit="step") if s.progress else None
    try:
        for _epoch in range(s.epochs):
            perm = train_idx[rng.permutation(len(train_idx))]
            total = 0.0
            for start in range(0, len(perm), s.batch_size):
                b = np.sort(perm[start:start + s.batch_size])
                px = torch.from_numpy(pixels[b])
                y = targets[b].to(device).long()
                flip = torch.from_numpy(rng.random(len(b)) < 0.5)
                if flip.any():  # horizontal flips: a photo's mirror is a photo of the same world
                    px[flip] = px[flip].flip(2)
                    y[flip.to(device)] = y[flip.to(device)].flip(2)
                logits = segmenter.label_logits(segmenter_input(segmenter, px, device))
                logits = F.interpolate(logits, size=y.shape[-2:], mode="bilinear", align_corners=False)
                loss = F.cross_entropy(logits, y, weight=weights, ignore_index=IGNORE)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(b)
                if pbar is not None:
                    pbar.update(1)
                    pbar.set_postfix(loss=f"{float(loss):.3f}", refresh=False)
            history.append(total / len(train_idx))
    finally:
        if pbar is not None:
            pbar.close()
    net.eval()
    net.requires_grad_(False)

    commonest = int(np.bincount(maps[train_idx][maps[train_idx] != IGNORE], minlength=256).argmax())
    acc, chance, miou = _held_out_scores(segmenter, pixels[val_idx], maps[val_idx], commonest, device)
    seconds = time.perf_counter() - t0
    where = ", ".join(os.fspath(x) for x in sources)
    cfg.trained_on = (f"class maps of {len(train_idx)} images ({where}), {s.epochs} epochs; held-out pixel "
                      f"accuracy {acc:.1%}")
    result = SegmenterTrainResult(Path(out_dir), labels, len(train_idx), n_val, skipped, acc, chance, miou,
                                  history[-1], seconds, history)
    save_segmenter(segmenter.cpu(), cfg, out_dir, training={
        "sources": [os.fspath(x) for x in sources], "image_size": image_size, "labels": labels,
        "n_train": len(train_idx), "n_val": n_val, "n_without_map": skipped, "epochs": s.epochs,
        "batch_size": s.batch_size, "lr": s.lr, "seed": s.seed, "loss_per_epoch": history,
        "pixel_accuracy": acc, "chance_accuracy": chance, "mean_iou": miou, "seconds": round(seconds, 1),
    })
    return result


def class_weights(targets: np.ndarray, n_labels: int, balance: float):
    """Loss weights per label: pixel share ** -balance (0: plain cross-entropy), scaled so that the
    average pixel weighs 1; rare classes (cars, palms, houses: cues of a place) are not drowned by
    sky and road. A label absent from `targets` gets the largest weight."""
    import torch

    counts = np.bincount(targets[targets != IGNORE].ravel(), minlength=n_labels)[:n_labels].astype(np.float64)
    share = np.maximum(counts, 1) / max(1, counts.sum())
    w = share ** -float(balance)
    w /= max(1e-12, float((share * w).sum()))
    return torch.tensor(w, dtype=torch.float32)


def _held_out_scores(segmenter, pixels: np.ndarray, maps: np.ndarray, commonest: int, device,
                     batch: int = 256) -> tuple[float, float, float]:
    """(pixel accuracy, commonest-class accuracy, mean IoU) of the segmenter's real forward (the
    arg-max class map the encoder would get) on labelled held-out pixels."""
    import torch

    if len(pixels) == 0:
        return float("nan"), float("nan"), float("nan")
    from geosurge_index.geometry import clip_normalise

    preds = []
    with torch.inference_mode():
        for i in range(0, len(pixels), batch):
            preds.append(segmenter(clip_normalise(pixels[i:i + batch], device)).cpu().numpy())
    pred = np.concatenate(preds)
    lab = maps != IGNORE
    truth, guess = maps[lab].astype(np.int64), pred[lab]
    if truth.size == 0:
        return float("nan"), float("nan"), float("nan")
    ious = []
    for c in np.unique(truth):
        inter = np.count_nonzero((truth == c) & (guess == c))
        union = np.count_nonzero((truth == c) | (guess == c))
        ious.append(inter / union)
    return float(np.mean(guess == truth)), float(np.mean(truth == commonest)), float(np.mean(ious))
