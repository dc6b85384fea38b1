"""`geosurge train RECIPE.toml [--resume] [--out RUN_DIR]`."""

from __future__ import annotations

import argparse

from geosurge_index.cli.model_info import add_config_arguments, resolve_config

DESCRIPTION = """\
Train GeoSURGE from a TOML recipe: the visual encoder (CLIP + semantic fusion) and one geographic
embedding table per hierarchy level, with a summed per-level InfoNCE loss.

Writes RUN_DIR/epoch-NNNN/ after every epoch (model.safetensors + config.json + train state +
a copy of the partition: a checkpoint alone can be exported), RUN_DIR/metrics.jsonl (one JSON line
per epoch: losses, per-level accuracy, % within 1/25/200/750/2500 km on the validation split,
samples/s, skipped images), and RUN_DIR/run.json (best and last checkpoint).

Recipes: build/mp16.toml (the paper's set-up; edit its data paths), build/tiny.toml (a config-built
tiny model on a generated demo world: trains on a laptop CPU in minutes).

Several GPUs (or CPU processes): run the same command under torchrun, e.g.
  torchrun --standalone --nproc_per_node 8 --no-python geosurge train build/mp16.toml
"""

EPILOG = """\
examples:
  geosurge train build/tiny.toml --out runs/tiny
  geosurge train build/tiny.toml --out runs/tiny --resume      # continue after an interruption
  geosurge train build/mp16.toml --epochs 1 --max-steps-per-epoch 20   # a smoke test
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train the model from a TOML recipe (checkpoints every epoch, resumable)",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", metavar="RECIPE.toml", help="the training recipe ([model], [data], [train], out)")
    p.add_argument("--out", metavar="RUN_DIR", default=None,
                   help="where checkpoints and metrics go (default: the recipe's `out`)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in RUN_DIR: weights, optimizer, lr schedule, RNG "
                        "and the position in the epoch's data order (default: start fresh; RUN_DIR must not "
                        "already hold checkpoints)")
    p.add_argument("--epochs", type=int, default=None, help="override [train] epochs (default: the recipe's)")
    p.add_argument("--max-steps-per-epoch", type=int, default=None,
                   help="override [train] max_steps_per_epoch: cap optimizer steps per epoch, for smoke tests "
                        "(default: the recipe's; 0 = whole split)")
    p.add_argument("--workers", type=int, default=None,
                   help="override [train] workers: DataLoader decoding processes (default: the recipe's)")
    p.add_argument("--threads", type=int, default=None,
                   help="override [train] threads: torch CPU threads per process (default: the recipe's; 0 = torch default)")
    p.add_argument("--device", default=None, help="override [train] device: auto, cpu, cuda, cuda:N (default: the recipe's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on stderr)")
    p.set_defaults(func=run)


def run(args) -> int:
    import os

    from geosurge_index.errors import UserError
    from geosurge_index.train import Trainer, load_recipe

    for flag, value, least in (("--epochs", args.epochs, 1), ("--max-steps-per-epoch", args.max_steps_per_epoch, 0),
                               ("--workers", args.workers, 0), ("--threads", args.threads, 0)):
        if value is not None and value < least:
            raise UserError(f"{flag} {value}: must be at least {least}")
    recipe = load_recipe(args.recipe)
    for name in ("epochs", "max_steps_per_epoch", "workers", "device", "threads"):
        value = getattr(args, name)
        if value is not None:
            setattr(recipe.train, name, value)
    result = Trainer(recipe, args.out, resume=args.resume, progress=not args.no_progress).run()
    if os.environ.get("RANK", "0") != "0":  # under torchrun the summary is printed once, by rank 0
        return 0
    if result.last_checkpoint is None:
        print(f"nothing to do: {result.run_dir} already finished ({result.epochs_run} epochs)")
    else:
        best = f"epoch-{result.best_epoch:04d}" if result.best_epoch else "-"
        print(f"run {result.run_dir}: {result.epochs_run} epochs{' (early stop)' if result.stopped_early else ''}; "
              f"best {best} (val loss {result.best_val_loss:.4f}); last {result.last_checkpoint}")
    return 0


# -- bench (geosurge_index.bench.train) ----------------------------------------------------------


def register_bench(bench_subparsers) -> None:
    from geosurge_index.bench.train import DESCRIPTION

    p = bench_subparsers.add_parser(
        "train", help="speed of training steps, encoder inference and segmentation (random weights)",
        description=DESCRIPTION, epilog="Example:\n  geosurge bench train --preset tiny --steps 3",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, "tiny")
    p.add_argument("--batch", type=int, default=8, help="images per step (default: %(default)s)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: %(default)s)")
    p.add_argument("--cells", type=int, default=20000, help="cells per level for the geo tables (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: %(default)s)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: 0 = torch's default)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU (default: %(default)s)")
    p.add_argument("--skip-segmenter", action="store_true", help="do not time the segmenter (default: time it)")
    p.set_defaults(func=run_bench)


def run_bench(args) -> int:
    from geosurge_index.bench.train import TrainBench, run_train_bench
    from geosurge_index.cli import settings_from_args

    config, name, _ = resolve_config(args, "tiny")
    run_train_bench(config, name, settings_from_args(TrainBench, args))
    return 0
