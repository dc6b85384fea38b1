"""`geosurge ablations` (also `geosurge demo --ablations`): the paper's ablations on the demo world."""

from __future__ import annotations

import argparse
from pathlib import Path

DESCRIPTION = """\
Train and evaluate variants of the model on the procedural demo world, for several seeds, and
print one table of % of test photos within 1 / 25 / 200 / 750 / 2500 km (mean ± spread over
seeds), in the directions of the paper's ablations (Tables VII/VIII) and of the choices the paper
leaves open:

  levels trained   7, 5, 3, 1 levels (partitions from that many of the tau_max values, always
                   ending with the finest: the prediction space stays the same)
  fusion read-out  fused CLS alone, fused CLS + CLIP's CLS, the latter without self-attention
                   among the semantic tokens or without the LayerNorm on them, CLIP's CLS
                   attending to semantic and CLIP tokens jointly, CLIP's CLS + a gated fused
                   CLS (gate from 0), and no fusion
  head             geographic embeddings vs a plain classification head over the finest cells
  search           exhaustive vs a narrow beam (--beam)
  test crops       centre crop vs ten-crop (the paper's test protocol)
  loss negatives   softmax over all cells of a level vs in-batch InfoNCE

The model and hyper-parameters come from the demo recipe (build/demo.toml, the tiny
config-built model); the world and its partitions are made once under OUT and reused. Each
training takes a minute or more on a CPU, so the full table (10 trainings x --seeds) takes tens
of minutes; --only runs some groups, --quick a smoke run (tiny world, 1 seed, 1 optimizer step
per training: it checks that every variant builds, trains and evaluates; its numbers mean nothing).
The demo world is synthetic: the table says which design choices pay off on it, not on MP-16.

--world map-cues trains and tests on the same photos with class maps that also name a
fine-grained kind of vegetation (tree, palm, plant, flower) and building (building, house,
skyscraper, hut, tower) per place (S2 level-4 and level-6 cells), drawn the same in the pixels:
the map then carries location signal that the pixels lack, as a segmenter trained on another
dataset does on real photos (on the plain world the map labels only what the pixels show). It
lives in OUT/map-cues/, apart from the plain world. --probe-rolled-maps adds, under every row,
the same models evaluated with each test photo's class map swapped for another photo's, and the
change (paired per seed): a model that uses the map loses accuracy, one that ignores it does not.

Examples:
  geosurge ablations                                   # the whole table, 3 seeds
  geosurge ablations --only "fusion read-out" --seeds 5 --json fusion.json
  geosurge ablations --trainings readout-gated,no-fusion --epochs 6   # two variants, longer
  geosurge ablations --quick                           # a minute: every variant runs
  geosurge ablations --world map-cues --only "fusion read-out" --probe-rolled-maps \
      --trainings readout-cls+clip,readout-gated,readout-joint,no-fusion   # does fusion use the map?
  geosurge demo --ablations --json ablations.json      # the same, from the demo command
"""


def add_arguments(p: argparse.ArgumentParser, *, prefix: str = "") -> None:
    """The ablation flags (`prefix` "ablation-" under `geosurge demo`, where --train/--test/--seed
    mean the demo's own)."""
    from geosurge_index.ablations import TRAININGS, WORLDS, AblationSettings

    d = AblationSettings()
    p.add_argument(f"--{prefix}out", type=Path, default=d.out_dir, metavar="OUT", dest="ablation_out",
                   help="folder for the world, partitions and runs (default: %(default)s)")
    p.add_argument(f"--{prefix}train", type=int, default=d.n_train, metavar="N", dest="ablation_train",
                   help="training photos (default: %(default)s)")
    p.add_argument(f"--{prefix}test", type=int, default=d.n_test, metavar="N", dest="ablation_test",
                   help="test photos (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=d.seeds, help="training seeds per variant (default: %(default)s)")
    p.add_argument(f"--{prefix}epochs", type=int, default=d.epochs, dest="ablation_epochs",
                   help="epochs per training (default: %(default)s)")
    p.add_argument("--beam", type=int, default=d.beam,
                   help="cells kept per level in the beam row (default: %(default)s; the demo's trees are small)")
    p.add_argument("--only", default="", metavar="GROUP[,GROUP]",
                   help="run only these row groups (e.g. 'fusion read-out,test crops'; default: all)")
    p.add_argument("--trainings", default="", metavar="KEY[,KEY]",
                   help="of those rows, only the ones of these trainings (e.g. 'readout-gated,no-fusion'; "
                        "keys: " + ", ".join(TRAININGS).replace("%", "%%") + "; default: all)")
    p.add_argument(f"--{prefix}world", choices=list(WORLDS), default=d.world, dest="ablation_world",
                   help="plain: the demo world (default); map-cues: its class maps also name a kind of "
                        "vegetation and building per place, which the pixels do not show "
                        "(e.g. --{prefix}world map-cues; kept in OUT/map-cues/)".replace("{prefix}", prefix))
    p.add_argument("--probe-rolled-maps", action="store_true",
                   help="also evaluate every row with each test photo's class map swapped for its batch "
                        "neighbour's, and print the change: does the model use the map?")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: a tiny world, 1 seed, 1 optimizer step per training")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the table as JSON")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ablations",
        help="the paper's ablations on the demo world: levels, fusion, head, beam, ten-crop, negatives",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from geosurge_index.ablations import AblationSettings, format_table, run_ablations, write_json

    if getattr(args, "no_progress", False):
        os.environ["GEOSURGE_NO_PROGRESS"] = "1"
    only = tuple(g.strip() for g in str(args.only or "").split(",") if g.strip())
    trainings = tuple(t.strip() for t in str(getattr(args, "trainings", "") or "").split(",") if t.strip())
    settings = AblationSettings(out_dir=args.ablation_out, n_train=args.ablation_train, n_test=args.ablation_test,
                                seeds=args.seeds, epochs=args.ablation_epochs, beam=args.beam, only=only,
                                trainings=trainings, world=getattr(args, "ablation_world", "plain"),
                                probe_rolled_maps=bool(getattr(args, "probe_rolled_maps", False)),
                                quick=args.quick, progress=not getattr(args, "no_progress", False))
    result = run_ablations(settings)
    print(format_table(result), flush=True)
    if args.json is not None:
        write_json(result, args.json)
        print(f"written: {args.json}")
    return 0
