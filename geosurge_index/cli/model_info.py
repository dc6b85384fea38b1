"""`geosurge model-info [RECIPE | --preset full|tiny | INDEX_DIR]`: parameter counts without any
weights, or what an index's model is (kind, embedding width, provenance, licence)."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Print the parameter counts (total and trainable, per part) of a model configuration: the
paper's full-size set-up, the tiny test model, or a recipe's [model]. The model is built on
PyTorch's meta device from configs only, so nothing is downloaded and no memory is used for
weights. Geographic tables are sized from a partition (--cells, or the recipe's [data] cells)
or, without one, from --cells-per-level.

Given an INDEX_DIR instead, print what made its embeddings: the encoder kind (geosurge, or an
imported model such as geoclip), the embedding width, the input size, the pretrained tower it
loads, the provenance and licence of imported weights, and the cells per level.

examples:
  geosurge model-info --preset full
  geosurge model-info geoclip-index/ --json
"""


def add_config_arguments(p: argparse.ArgumentParser, default_preset: str) -> None:
    """RECIPE / --preset: which model config a command builds (read by `resolve_config`)."""
    p.add_argument("recipe", nargs="?", metavar="RECIPE.toml", help="a training recipe (its [model] section)")
    p.add_argument("--preset", choices=["full", "tiny"], default=None,
                   help=f"a built-in config instead of a recipe (default: {default_preset} when no recipe is given)")


def resolve_config(args: argparse.Namespace, default_preset: str):
    """(ModelConfig, its name, the Recipe or None) from the arguments of `add_config_arguments`."""
    from geosurge_index.model.config import PRESETS

    if args.recipe:
        from geosurge_index.train import load_recipe

        recipe = load_recipe(args.recipe)
        return recipe.model, args.recipe, recipe
    name = args.preset or default_preset
    return PRESETS[name](), name, None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "model-info", help="parameter counts of a model config (meta device, no downloads)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Examples:\n  geosurge model-info --preset full\n  geosurge model-info build/tiny.toml --cells cells/")
    add_config_arguments(p, "full")
    for action in p._actions:  # this command also reads an index
        if action.dest == "recipe":
            action.metavar, action.help = "RECIPE.toml|INDEX_DIR", action.help + ", or an INDEX_DIR (its model)"
    p.add_argument("--cells", metavar="CELLS_DIR", default=None,
                   help="size the geographic tables from this partition (default: the recipe's, if any)")
    p.add_argument("--cells-per-level", default="3298,7202,12893,16000,19000,21000,23000",
                   help="comma-separated cells per level when no partition is given (default: MP-16-like "
                        "%(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def run(args) -> int:
    import json
    from pathlib import Path

    import torch

    from geosurge_index.errors import UserError
    from geosurge_index.model.geosurge import GeoSurgeModel, parameter_report

    if args.recipe and Path(args.recipe).is_dir():
        return index_model_info(Path(args.recipe), args.json)
    config, name, recipe = resolve_config(args, "full")
    cells_dir = args.cells
    if not cells_dir and recipe is not None and recipe.data.cells:
        from pathlib import Path

        if Path(recipe.data.cells, "partition.json").is_file():
            cells_dir = recipe.data.cells
        else:
            print(f"(the recipe's partition {recipe.data.cells} is not there: using --cells-per-level)")
    if cells_dir:
        from geosurge_index.cells import read_cells

        sizes = [len(lc) for lc in read_cells(cells_dir).levels]
    else:
        try:
            sizes = [int(v) for v in args.cells_per_level.split(",")]
        except ValueError as err:
            raise UserError(f"--cells-per-level {args.cells_per_level!r}: expected comma-separated integers") from err
    with torch.device("meta"):
        model = GeoSurgeModel(config, sizes, weights=False)
    rows = parameter_report(model)
    info = {"config": name, "image_size": config.image_size, "embed_dim": config.embed_dim,
            "fusion": config.fusion.enabled, "cells_per_level": sizes,
            "parts": [{"part": p, "total": t, "trainable": tr} for p, t, tr in rows]}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model {name}: image {config.image_size}px, embedding {config.embed_dim}-d, "
          f"fusion {'on (' + str(config.fusion.blocks) + ' blocks)' if config.fusion.enabled else 'off'}, "
          f"segmenter {config.segmenter.kind}, cells per level {sizes}")
    print(f"{'part':<40}{'total':>16}{'trainable':>16}")
    for part, total, trainable in rows:
        print(f"{part:<40}{total:>16,}{trainable:>16,}")
    return 0


def index_model_info(index_dir, as_json: bool) -> int:
    """What an index's model is: manifest `model` + encoder.json, no weights loaded."""
    import json

    from geosurge_index.index import read_manifest
    from geosurge_index.model.encoder_io import ENCODER_JSON, read_encoder_meta

    manifest = read_manifest(index_dir)
    model = dict(manifest.get("model") or {})
    enc = read_encoder_meta(index_dir) if (index_dir / ENCODER_JSON).is_file() else {}
    kind = model.get("kind") or enc.get("kind") or ("geosurge" if manifest.get("encoder") else None)
    tower = (enc.get("clip") or {}).get("source") if enc.get("kind") == "geoclip" else \
        ((enc.get("model") or {}).get("backbone") or {}).get("pretrained")
    info = {"index": str(index_dir), "kind": kind, "embed_dim": int(manifest["dim"]),
            "image_size": enc.get("image_size"), "pretrained_tower": tower,
            "licence": model.get("licence") or enc.get("licence"),
            "provenance": model.get("provenance") or enc.get("provenance"),
            "cells_per_level": [e["n_cells"] for e in manifest["levels"]],
            "temperatures": [e["temperature"] for e in manifest["levels"]], "source": manifest.get("source")}
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"index {index_dir}: encoder {kind or 'absent'}, embedding {info['embed_dim']}-d"
          + (f", input {info['image_size']} px" if info["image_size"] else "")
          + (f", pretrained tower {tower}" if tower else ""))
    print(f"cells per level {info['cells_per_level']}, temperatures "
          f"{sorted({round(t, 5) for t in info['temperatures']})}")
    if info["licence"]:
        print(f"licence of the imported weights: {info['licence']}")
    for key, value in (info["provenance"] or {}).items():
        print(f"  {key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    return 0
