"""`geosurge demo`: the whole system, end to end, on the procedural demo world (CPU, minutes)."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """\
Run every stage on the built-in demo world, on this machine's CPU:

  1. world      render training and test photos (JPEG + ADE20K class maps + manifest.csv) of a
                procedural world whose content depends on location; locations follow MP-16's
                real photo density
  2. partition  the 7-level adaptive S2 hierarchy of the training locations (tau scaled down)
  3. segmenter  a small segmenter trained on the training photos' class maps, for photos
                located without one (bytes, uploads, new photos); its maps of the training
                photos (`geosurge segment --segmenter small`) are what the model trains on
  4. train      a tiny model from the recipe (default build/demo.toml)
  5. export     the index (FAISS levels, cells.duckdb, encoder with that segmenter)
  6. locate     the test photos, with the bulk pipeline: with their class maps, and again
                without them (the index's segmenter makes the maps)
  7. evaluate   accuracy at 1/25/200/750/2500 km: the model with and without class maps,
                random-cell guessing, the densest cell, and the same model using its finest
                level alone
  8. sql        two SQL recipes from queries/
  9. map        predicted vs true points

Everything is written under OUT (default ./demo-out). Running it again reuses every stage whose
outputs exist and were made with the same settings; --fresh redoes everything. The demo world is
synthetic: its accuracy says the system works end to end, not how well it geolocates real
photos (for that, see build/mp16.toml and README).

--ablations runs the paper's ablations on the demo world instead (`geosurge ablations --help`):
  geosurge demo --ablations --seeds 3 --json ablations.json
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the whole system end to end on the procedural demo world (CPU, a few minutes)",
        description=DESCRIPTION,
        epilog="Examples:\n  geosurge demo --out demo/\n  geosurge demo --out demo/ --train 4000 --test 500 --fresh",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from geosurge_index.demo import DEFAULT_RECIPE, DemoSettings

    d = DemoSettings()
    p.add_argument("--out", "-o", type=Path, default=d.out_dir, metavar="OUT",
                   help="folder for everything the demo writes (default: %(default)s)")
    p.add_argument("--train", type=int, default=d.n_train, metavar="N",
                   help="training photos to render (default: %(default)s)")
    p.add_argument("--test", type=int, default=d.n_test, metavar="N",
                   help="held-out test photos, an independent draw (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the world and the baselines (default: %(default)s)")
    p.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE, metavar="RECIPE.toml",
                   help="training recipe; its [data] paths and `out` are filled in by the demo (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (default: the recipe's)")
    p.add_argument("--tau-min", type=int, default=None, metavar="N",
                   help=f"partition: drop cells with fewer than N photos (default: {d.tau_min} at "
                        f"{d.n_train} training photos, in proportion to --train otherwise)")
    p.add_argument("--tau-max", default=None, metavar="N1,...,N7",
                   help="partition: split cells with more than this many photos, per level, coarsest first "
                        f"(default: {','.join(map(str, d.tau_max))} at {d.n_train} training photos, "
                        "in proportion to --train otherwise)")
    p.add_argument("--fresh", action="store_true", help="redo every stage instead of reusing what is built")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    abl = p.add_argument_group("ablations (with --ablations; see `geosurge ablations --help`)")
    abl.add_argument("--ablations", action="store_true",
                     help="instead of the demo, train and evaluate the paper's ablations on the demo world")
    from geosurge_index.cli.ablations import add_arguments

    add_arguments(abl, prefix="ablation-")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    if args.ablations:
        from geosurge_index.cli.ablations import run as run_ablations

        return run_ablations(args)

    from geosurge_index.demo import DemoSettings, run_demo
    from geosurge_index.errors import UserError

    tau_max = None
    if args.tau_max is not None:
        try:
            tau_max = tuple(int(x) for x in str(args.tau_max).split(","))
        except ValueError:
            raise UserError(f"--tau-max {args.tau_max!r}: give comma-separated integers") from None
    if args.no_progress:
        os.environ["GEOSURGE_NO_PROGRESS"] = "1"
    settings = DemoSettings(
        out_dir=args.out, n_train=args.train, n_test=args.test, seed=args.seed, recipe=args.recipe,
        tau_min=args.tau_min, tau_max=tau_max, epochs=args.epochs, fresh=args.fresh,
        progress=not args.no_progress,
    )
    result = run_demo(settings)
    return 0 if result.ok() else 1


def register_bench(bench_subparsers) -> None:
    p = bench_subparsers.add_parser(
        "demo-world",
        help="speed of the demo world generator (photos per minute on one core)",
        description="Render N demo-world photos and write them (JPEG + class map PNG + manifest) into a "
                    "temporary folder, in this one process (one core). Prints the machine, the method and "
                    "photos per minute for rendering alone and for rendering + writing.",
        epilog="Example: geosurge bench demo-world --n 200",
    )
    p.add_argument("--n", type=int, default=2000, help="photos to render (default: %(default)s)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="world seed (default: %(default)s)")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from geosurge_index.bench.demo import DemoWorldBench, run_demo_world_bench
    from geosurge_index.cli import settings_from_args

    run_demo_world_bench(settings_from_args(DemoWorldBench, args))
    return 0
