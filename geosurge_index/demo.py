"""The end-to-end demo: every stage of the system on the procedural demo world, on a CPU.

    world (train + test photos) -> partition -> train -> segmenter -> export -> locate (with and
    without class maps) -> evaluate -> sql -> map

Each stage runs the project's own code (the Python API or the `geosurge` subcommand a user would
type, printed as it runs) and writes under OUT (default ./demo-out). A stage is skipped when its
outputs exist and were made from the same inputs and settings (a fingerprint per stage, kept in
OUT/.demo/); `fresh=True` redoes everything. A stage that is not available in this install, or
fails, is reported plainly and the stages that do not depend on it still run.

The result is one table: % of test photos within 1 / 25 / 200 / 750 / 2500 km for the trained
model (its best cell's mean point; located with the world's class maps, and without them:
segmented by the small segmenter the index ships, trained on the training photos' maps), the same
model with the training photos as a gallery (the nearest training photo inside the best cells,
`geosurge gallery`), random-cell guessing, always predicting the densest cell, and the same model
using the finest level alone (the paper's depth ablation, on the same embeddings). Then a
personal-archive scenario: trips of photos within a few km, half of each trip geotagged and added
as a gallery, the other half located with and without it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shlex
import shutil
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from geosurge_index.errors import UserError

DEMO_STATE = ".demo"
DEFAULT_RECIPE = Path("build/demo.toml")
# Tau values scaled to the demo's size: MP-16 uses 25,000 .. 500 and tau_min 50 for 4.72 M
# photos; the demo's few thousand photos need cells of tens, not thousands, to have 7 levels.
# These are for DEMO_TAU_AT photos; other sizes scale them in proportion (`scaled_taus`).
DEMO_TAU_AT = 6000
DEMO_TAU_MIN = 4
DEMO_TAU_MAX = (800, 400, 200, 100, 50, 25, 12)
SQL_RECIPES = ("accuracy.sql", "level_agreement.sql")  # from queries/; others there if these are gone
# The small segmenter the demo index ships (segmenter_train.py): every training photo, 6 epochs
# (at 3,000 photos x 3 epochs it got 93% of the pixels right and only 76% of the with-maps
# accuracy at 25 km; at 8,000 x 6, 97% and 92%).
DEMO_SEGMENTER_IMAGES: int | None = None
# 3 epochs: 0.918 / 0.935 of the with-maps accuracy at 25 / 2500 km in the default demo (6: 0.906 /
# 0.955, twice the time), within make demo's 10 minutes
DEMO_SEGMENTER_EPOCHS = 3
MODEL_ROW = "GeoSURGE, with class maps"
NO_MAPS_ROW = "GeoSURGE, without class maps (the index's segmenter)"
GALLERY_ROW = "with the training set as gallery"


@dataclass(frozen=True)
class DemoSettings:
    out_dir: Path = Path("demo-out")
    n_train: int = 8000
    n_test: int = 500
    seed: int = 0
    recipe: Path = DEFAULT_RECIPE  # the training recipe; its [data] and `out` are filled in here
    tau_min: int | None = None  # None: scaled to n_train (`scaled_taus`)
    tau_max: tuple[int, ...] | None = None
    epochs: int | None = None  # None: the recipe's
    segmenter_images: int | None = DEMO_SEGMENTER_IMAGES  # None: every training photo
    segmenter_epochs: int = DEMO_SEGMENTER_EPOCHS
    image_size: int | None = None  # None: the recipe model's input size
    fresh: bool = False
    progress: bool = True
    archive_trips: int = 30  # the personal-archive scenario's trips (10 photos each, 5 geotagged); 0: none

    def __post_init__(self):
        if self.n_train < 50 or self.n_test < 1:
            raise UserError(f"need at least 50 training and 1 test photo, got {self.n_train} and {self.n_test}")
        tau_min, tau_max = scaled_taus(self.n_train)
        object.__setattr__(self, "tau_min", tau_min if self.tau_min is None else int(self.tau_min))
        object.__setattr__(self, "tau_max", tau_max if self.tau_max is None else tuple(self.tau_max))


def scaled_taus(n_train: int) -> tuple[int, tuple[int, ...]]:
    """The demo's partition thresholds for n_train photos: DEMO_TAU_* in proportion, at least 2."""
    f = n_train / DEMO_TAU_AT
    tau_max = tuple(max(2, round(t * f)) for t in DEMO_TAU_MAX)
    return max(1, min(round(DEMO_TAU_MIN * f), tau_max[-1])), tau_max


@dataclass
class StageReport:
    name: str
    status: str  # ran | reused | unavailable | failed | skipped
    seconds: float = 0.0
    note: str = ""


@dataclass
class DemoResult:
    out_dir: Path
    stages: list[StageReport] = field(default_factory=list)
    table: dict[str, dict[float, float]] = field(default_factory=dict)  # method -> threshold -> %
    archive_table: dict[str, dict[float, float]] = field(default_factory=dict)  # the archive scenario
    artefacts: dict[str, Path] = field(default_factory=dict)

    def ok(self) -> bool:
        return all(s.status in ("ran", "reused") for s in self.stages)


class StageUnavailable(Exception):
    """The install lacks what the stage needs (a module or subcommand not built yet)."""


class _Skip(Exception):
    """An upstream stage did not produce what this one needs."""


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def available_commands() -> set[str]:
    """The subcommands this install's `geosurge` has (stages not built yet are absent)."""
    import argparse

    from geosurge_index.cli import build_parser

    for action in build_parser()._actions:  # argparse keeps subcommands only here
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def has_command(name: str) -> bool:
    return name in available_commands()


def geosurge(argv: list) -> None:
    """Run one `geosurge` subcommand in this process, printing it as a user would type it."""
    from geosurge_index.cli import main

    if not has_command(str(argv[0])):
        raise StageUnavailable(f"`geosurge {argv[0]}` is not in this install")
    _say("  $ geosurge " + " ".join(shlex.quote(str(a)) for a in argv))
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse refusing the flags
        code = exc.code if isinstance(exc.code, int) else 2
    if code != 0:
        raise RuntimeError(f"`geosurge {argv[0]}` exited with status {code}")


class _Runner:
    """Runs stages with fingerprints: reuse when unchanged and complete, redo otherwise.

    A stage's fingerprint covers its settings and the output ids of the stages it reads; every
    run gives its outputs a new id, so whatever reads them runs again."""

    def __init__(self, out: Path, fresh: bool, result: DemoResult):
        self.state = out / DEMO_STATE
        self.state.mkdir(parents=True, exist_ok=True)
        self.fresh = fresh
        self.result = result
        self.prints: dict[str, str] = {}
        self.current = ""

    def run(self, name: str, inputs: dict, needs: tuple[str, ...], complete: Callable[[], bool],
            action: Callable[[], None]) -> bool:
        t0 = time.perf_counter()
        missing = [n for n in needs if n not in self.prints]
        if missing:
            self._report(name, "skipped", t0, f"needs {', '.join(missing)}")
            return False
        fp = _fingerprint({"inputs": inputs, "upstream": [self.prints[n] for n in needs]})
        marker = self.state / f"{name}.json"
        try:
            saved = json.loads(marker.read_text()) if marker.is_file() else {}
        except (OSError, ValueError):
            saved = {}
        if not self.fresh and saved.get("fingerprint") == fp and saved.get("output_id") and complete():
            self.prints[name] = saved["output_id"]
            self._report(name, "reused", t0, "outputs exist and are up to date")
            return True
        marker.unlink(missing_ok=True)
        self.current = fp  # what the action may stamp its partial outputs with (see train)
        _say(f"\n== {name}")
        try:
            action()
        except StageUnavailable as err:
            self._report(name, "unavailable", t0, str(err))
            return False
        except _Skip as err:
            self._report(name, "skipped", t0, str(err))
            return False
        except Exception as err:  # noqa: BLE001 - report and go on with the independent stages
            self._report(name, "failed", t0, f"{type(err).__name__}: {err}")
            return False
        if not complete():
            self._report(name, "failed", t0, "finished without writing its outputs")
            return False
        # A fresh id for these outputs: the stages after this one see new inputs and run again.
        output_id = _fingerprint({"fingerprint": fp, "made": time.time_ns()})
        marker.write_text(json.dumps({"fingerprint": fp, "output_id": output_id, "inputs": inputs},
                                     default=str, indent=2) + "\n")
        self.prints[name] = output_id
        self._report(name, "ran", t0)
        return True

    def _report(self, name: str, status: str, t0: float, note: str = "") -> None:
        rep = StageReport(name, status, time.perf_counter() - t0, note)
        self.result.stages.append(rep)
        if status in ("ran",):
            _say(f"   {name}: done in {rep.seconds:.1f} s")
        else:
            _say(f"== {name}: {status}{' - ' + note if note else ''}")


# ---------------------------------------------------------------------------------------------
# The recipe


def repo_path(rel: str | os.PathLike) -> Path:
    """A repository file (build/..., queries/...): from the current directory, else beside the
    package (an editable install run from elsewhere)."""
    p = Path(rel)
    if p.is_absolute() or p.exists():
        return p
    beside = Path(__file__).resolve().parents[1] / p
    return beside if beside.exists() else p


def _load_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"training recipe {path} does not exist (run from the repository root, or "
                        "give --recipe)") from None
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise UserError(f"training recipe {path} is not valid TOML: {err}") from err


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string is JSON-compatible for our values
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def dump_toml(d: dict, prefix: str = "") -> str:
    """A small TOML writer for recipes (scalars, lists, nested tables)."""
    scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
    tables = {k: v for k, v in d.items() if isinstance(v, dict)}
    lines = [f"{k} = {_toml_value(v)}" for k, v in scalars.items()]
    for k, v in tables.items():
        name = f"{prefix}.{k}" if prefix else k
        body = dump_toml(v, name)
        lines += ["", f"[{name}]", body] if body.strip() else ["", f"[{name}]"]
    return "\n".join(lines).replace("\n\n\n", "\n\n")


def recipe_image_size(raw: dict) -> int:
    from geosurge_index.train import model_config_from

    return model_config_from(raw.get("model", {})).image_size


# ---------------------------------------------------------------------------------------------
# Baselines and scores


def read_manifest_truth(manifest: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    with open(manifest, newline="") as f:
        rows = list(csv.DictReader(f))
    return ([r["id"] for r in rows], np.array([float(r["lat"]) for r in rows]),
            np.array([float(r["lon"]) for r in rows]))


def read_predictions(pred_dir: Path, ids: list[str], columns=("id", "lat", "lon")) -> dict[str, np.ndarray]:
    """PRED_DIR shards -> columns aligned with `ids` (NaN / None where an id has no row)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = sorted(pred_dir.glob("part-*.parquet"))
    if not shards:
        raise _Skip(f"{pred_dir} holds no prediction shards")
    table = pa.concat_tables([pq.read_table(s, columns=list(columns)) for s in shards])
    pos = {k: i for i, k in enumerate(table.column("id").to_pylist())}
    take = np.array([pos.get(i, -1) for i in ids])
    out: dict[str, np.ndarray] = {"found": take >= 0}
    for c in columns:
        if c == "id":
            continue
        col = table.column(c)
        if c in ("lat", "lon", "cell_lat", "cell_lon"):
            vals = col.to_numpy(zero_copy_only=False).astype(np.float64)
            out[c] = np.where(take >= 0, vals[np.maximum(take, 0)], np.nan)
        else:
            vals = col.to_pylist()
            out[c] = np.array([vals[t] if t >= 0 else None for t in take], dtype=object)
    return out


def _has_columns(pred_dir: Path, names) -> bool:
    import pyarrow.parquet as pq

    shards = sorted(pred_dir.glob("part-*.parquet"))
    return bool(shards) and set(names) <= set(pq.read_schema(shards[0]).names)


def baseline_points(cells_dir: Path, n: int, seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random-cell guessing and the densest cell, both predicting finest cells' mean points."""
    from geosurge_index.cells import read_cells

    cells = read_cells(cells_dir)
    finest = cells.level(cells.n_levels)
    if len(finest) == 0:
        raise _Skip("the partition has no cells at its finest level")
    pick = np.random.default_rng([seed, 31337]).integers(0, len(finest), n)
    densest = int(np.argmax(finest.n_samples))
    return {
        "random cell": (finest.mean_lat[pick], finest.mean_lon[pick]),
        "densest cell": (np.full(n, finest.mean_lat[densest]), np.full(n, finest.mean_lon[densest])),
    }


def finest_only_points(index_dir: Path, cells_dir: Path, embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The model's finest level alone: the nearest finest-cell embedding, no ancestors' scores."""
    import faiss

    from geosurge_index.cells import read_cells

    cells = read_cells(cells_dir)
    finest = cells.level(cells.n_levels)
    index = faiss.read_index(str(index_dir / f"level_{cells.n_levels}.faiss"))
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    _, best = index.search(emb, 1)
    best = best[:, 0]
    return finest.mean_lat[best], finest.mean_lon[best]


def format_table(table: dict[str, dict[float, float]], n: int) -> str:
    from geosurge_index.metrics import THRESHOLDS_KM

    w = max([28, *(len(name) + 2 for name in table)])
    head = f"{'method':<{w}}" + "".join(f"{int(t):>9} km" for t in THRESHOLDS_KM)
    lines = [f"% of {n} test photos within", head, "-" * len(head)]
    for name, acc in table.items():
        lines.append(f"{name:<{w}}" + "".join(f"{acc[float(t)]:>12.1f}" for t in THRESHOLDS_KM))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The demo


def run_demo(settings: DemoSettings) -> DemoResult:
    from geosurge_index import demo_world as dw

    s = settings
    out = s.out_dir
    if s.fresh and out.exists():
        _clean(out)
    out.mkdir(parents=True, exist_ok=True)
    result = DemoResult(out)
    runner = _Runner(out, s.fresh, result)
    raw_recipe = _load_toml(repo_path(s.recipe))
    image_size = s.image_size or recipe_image_size(raw_recipe)
    world_cfg = dw.WorldConfig(image_size=image_size)
    paths = {
        "train": out / "world" / "train", "test": out / "world" / "test", "cells": out / "cells",
        "recipe": out / "recipe.toml", "run": out / "run", "index": out / "index",
        "predictions": out / "predictions", "eval": out / "eval", "sql": out / "sql", "map": out / "map",
        "archive": out / "world" / "archive", "archive_preds": out / "archive-predictions",
        "segmenter": out / "segmenter", "test-no-maps": out / "world" / "test-no-maps",
        "predictions-no-maps": out / "predictions-no-maps", "train-maps": out / "world" / "train-segmented",
    }
    result.artefacts = dict(paths)
    _say(f"geosurge demo: {s.n_train} training and {s.n_test} test photos of the demo world "
         f"({image_size}x{image_size} px), everything under {out}/")

    # 1. The world: photos with MP-16's density; the test photos are a second, independent draw.
    for split, n, seed in (("train", s.n_train, s.seed), ("test", s.n_test, s.seed + 1000)):
        def make(split=split, n=n, seed=seed):
            dw.generate_split(paths[split], n, seed, world_cfg, prefix=split, progress=s.progress)
        runner.run(f"world-{split}", {"n": n, "seed": seed, "world": asdict(world_cfg)}, (),
                   lambda split=split, n=n, seed=seed: dw.existing_split(paths[split], n, seed, world_cfg,
                                                                         prefix=split) is not None,
                   make)

    # 2. Partition the training locations.
    def partition():
        from geosurge_index import cells as cm
        from geosurge_index.coords import read_coordinates

        manifest = paths["train"] / "manifest.csv"
        if has_command("partition"):
            try:
                geosurge(["partition", manifest, "--out", paths["cells"], "--tau-min", s.tau_min,
                          "--tau-max", ",".join(map(str, s.tau_max)), "--overwrite"])
                return
            except RuntimeError:
                _say("  (the partition subcommand refused these flags; using the Python API)")
        coords = read_coordinates(manifest)
        part = cm.partition(coords.lat, coords.lon, cm.PartitionSettings(s.tau_min, tuple(s.tau_max)),
                            source=str(manifest), progress=s.progress)
        cm.write_cells_dir(paths["cells"], part.cells, part.assignments, coords.rows)
        _say(cm.format_summary(part.cells, len(coords.lat)))

    runner.run("partition", {"tau_min": s.tau_min, "tau_max": list(s.tau_max)}, ("world-train",),
               lambda: (paths["cells"] / "partition.json").is_file(), partition)

    # 3. The segmenter the index ships, for photos without class maps: trained on the training
    # photos' class maps.
    seg_settings = _segmenter_settings(s)

    def segmenter():
        from geosurge_index.segmenter_train import train_segmenter

        _say(f"  training the small segmenter on the class maps of {paths['train'] / 'manifest.csv'}")
        res = train_segmenter([paths["train"] / "manifest.csv"], paths["segmenter"], image_size=image_size,
                              settings=seg_settings)
        _say("  " + res.line())

    runner.run("segmenter", {"settings": asdict(seg_settings), "image_size": image_size}, ("world-train",),
               lambda: (paths["segmenter"] / "segmenter.json").is_file(), segmenter)

    with_seg = "segmenter" in runner.prints

    # 3b. The model trains on that segmenter's maps of the training photos, as a real model trains
    # on the maps `geosurge segment` stores with the segmenter its index ships: photos located
    # without a map (bytes, uploads, new photos) then get the maps the model learned from. The
    # world's own maps are a perfect segmenter's, which a model trained on them comes to rely on.
    def train_maps():
        _copy_without_maps(paths["train"], paths["train-maps"])
        geosurge(["segment", paths["train-maps"] / "manifest.csv", "--segmenter", "small",
                  "--pretrained", paths["segmenter"], "--image-size", image_size])

    if with_seg:
        runner.run("train-maps", {"image_size": image_size}, ("world-train", "segmenter"),
                   lambda: (paths["train-maps"] / "manifest.csv").is_file() and not _missing_maps(paths["train-maps"]),
                   train_maps)
    train_split = paths["train-maps"] if with_seg and "train-maps" in runner.prints else paths["train"]

    # 4. Train the recipe's model on the training photos.
    recipe = _concrete_recipe(raw_recipe, paths, s, train_split)

    def train():
        from geosurge_index.train import find_resume_checkpoint

        stamp = paths["run"] / ".demo-inputs"  # the train fingerprint the run was started with
        same = stamp.is_file() and stamp.read_text() == runner.current
        if same and find_resume_checkpoint(paths["run"]) is not None:
            _say("  an interrupted run with the same recipe and data exists: resuming it")
            geosurge(["train", paths["recipe"], "--resume"])
            return
        paths["recipe"].write_text(dump_toml(recipe) + "\n")
        if paths["run"].exists():
            shutil.rmtree(paths["run"])
        paths["run"].mkdir(parents=True)
        stamp.write_text(runner.current)
        geosurge(["train", paths["recipe"]])

    from geosurge_index.train import model_config_from

    # the resolved model config too: a preset whose defaults changed (e.g. fusion.token_norm) retrains
    runner.run("train", {"recipe": recipe, "model": model_config_from(recipe.get("model", {})).to_dict()},
               ("world-train", "partition", *(("train-maps",) if train_split != paths["train"] else ())),
               lambda: _best_checkpoint(paths["run"]) is not None, train)

    # 5. Export the index (with the trained segmenter when there is one).

    def export():
        ckpt = _best_checkpoint(paths["run"])
        seg = ["--segmenter", paths["segmenter"]] if with_seg else []
        geosurge(["export", ckpt, "--out", paths["index"], "--overwrite", *seg])

    runner.run("export", {"segmenter": with_seg}, ("train", *(("segmenter",) if with_seg else ())),
               lambda: (paths["index"] / "manifest.json").is_file(), export)

    # 4b. Calibrate the index's confidence on the photos training held out (RUN_DIR/calibration.csv;
    # searched without galleries: the gallery below holds them, being the training photos).
    def calibrate():
        held_out = paths["run"] / "calibration.csv"
        if not held_out.is_file():
            raise _Skip(f"{held_out} is missing (the recipe keeps no calibration split)")
        geosurge(["calibrate", paths["index"], "--truth", held_out])

    runner.run("calibrate", {}, ("export",), lambda: (paths["index"] / "calibration.json").is_file(), calibrate)
    with_cal = "calibrate" in runner.prints

    # 4c. The training photos as a gallery inside the index: answers then come from the nearest
    # training photo inside the best cells (`geosurge gallery`).
    def gallery():
        geosurge(["gallery", "add", paths["index"], train_split / "manifest.csv", "--name", "train"])

    runner.run("gallery", {}, ("export", "world-train"), lambda: _has_gallery(paths["index"], "train"), gallery)
    with_gallery = "gallery" in runner.prints

    # 5. Geolocate the test photos with the bulk pipeline (embeddings kept for the ablation); with
    # the gallery, each row holds both answers: lat/lon (refined) and cell_lat/cell_lon.
    def locate():
        if paths["predictions"].exists():
            shutil.rmtree(paths["predictions"])
        geosurge(["locate", paths["index"], paths["test"] / "manifest.csv", "--out", paths["predictions"],
                  "--save-embeddings", *(["--galleries", "train"] if with_gallery else ["--galleries", "none"])])

    runner.run("locate", {"gallery": with_gallery},
               ("export", "world-test", *(("gallery",) if with_gallery else ()), *(("calibrate",) if with_cal else ())),
               lambda: any(paths["predictions"].glob("part-*.parquet")), locate)

    # The same test photos without their class-map files (what bytes, uploads and new photos are):
    # the index's segmenter makes the maps.
    def locate_no_maps():
        _copy_without_maps(paths["test"], paths["test-no-maps"])
        if paths["predictions-no-maps"].exists():
            shutil.rmtree(paths["predictions-no-maps"])
        geosurge(["locate", paths["index"], paths["test-no-maps"] / "manifest.csv",
                  "--out", paths["predictions-no-maps"], "--galleries", "none"])

    runner.run("locate-no-maps", {}, ("export", "world-test"),
               lambda: any(paths["predictions-no-maps"].glob("part-*.parquet")), locate_no_maps)

    # 6. Evaluate: the model, its finest level alone, and two baselines.
    def evaluate():
        paths["eval"].mkdir(parents=True, exist_ok=True)
        if "locate" in runner.prints:  # the full report of the model (cell accuracy per level too)
            geosurge(["eval", paths["predictions"], "--truth", paths["test"] / "manifest.csv",
                      "--index", paths["index"], "--json", paths["eval"] / "model.json",
                      "--plot", paths["eval"] / "confidence.png"])
        result.table = _evaluate(paths, s, runner)
        (paths["eval"] / "accuracy.json").write_text(json.dumps(
            {m: {str(int(t)): v for t, v in acc.items()} for m, acc in result.table.items()}, indent=2) + "\n")
        (paths["eval"] / "accuracy.txt").write_text(format_table(result.table, s.n_test) + "\n")

    # Baselines need only the partition and the test truth; the model rows need predictions.
    have_preds = "locate" in runner.prints
    no_maps = ("locate-no-maps",) if "locate-no-maps" in runner.prints else ()
    runner.run("evaluate", {"seed": s.seed, "with_model": have_preds, "no_maps": bool(no_maps)},
               ("partition", "world-test", *(("locate",) if have_preds else ()), *no_maps),
               lambda: (paths["eval"] / "accuracy.json").is_file(), evaluate)
    if not result.table and (paths["eval"] / "accuracy.json").is_file():
        saved = json.loads((paths["eval"] / "accuracy.json").read_text())
        result.table = {m: {float(t): v for t, v in acc.items()} for m, acc in saved.items()}

    # 7. Two SQL recipes from queries/.
    def sql():
        qdir = repo_path("queries")
        recipes = [qdir / q for q in SQL_RECIPES if (qdir / q).is_file()]
        if len(recipes) < 2:
            recipes += [q for q in sorted(qdir.glob("*.sql")) if q not in recipes]
        if not recipes:
            raise StageUnavailable("no SQL recipes under queries/ (run from the repository root)")
        paths["sql"].mkdir(parents=True, exist_ok=True)
        for q in recipes[:2]:
            geosurge(["sql", paths["index"], "-f", q, "--predictions", paths["predictions"],
                      "--truth", paths["test"] / "manifest.csv", "--format", "csv",
                      "--output", paths["sql"] / f"{q.stem}.csv"])
            _say(_preview_csv(paths["sql"] / f"{q.stem}.csv"))

    runner.run("sql", {"recipes": list(SQL_RECIPES)}, ("locate",),
               lambda: len(list(paths["sql"].glob("*.csv"))) >= 1, sql)

    # 8. The map.
    def draw():
        paths["map"].mkdir(parents=True, exist_ok=True)
        geosurge(["map", "predictions", paths["predictions"], "--truth", paths["test"] / "manifest.csv",
                  "--output", paths["map"] / "predictions.png"])

    runner.run("map", {}, ("locate",), lambda: any(paths["map"].glob("*.png")), draw)

    # 9. A personal archive: trips, part of each geotagged; the tagged photos become a gallery and
    # the others are located with and without it.
    _archive_scenario(runner, result, paths, world_cfg, s)

    _finish(result, s)
    return result


def _has_gallery(index_dir: Path, name: str) -> bool:
    try:
        manifest = json.loads((index_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return False
    return any(g.get("name") == name for g in manifest.get("galleries", []))


def _archive_scenario(runner: _Runner, result: DemoResult, paths: dict, world_cfg, s: DemoSettings) -> None:
    from geosurge_index import demo_world as dw

    if s.archive_trips < 1:
        return
    arch = dw.ArchiveConfig(n_trips=s.archive_trips)
    runner.run("world-archive", {"world": asdict(world_cfg), "archive": asdict(arch)}, (),
               lambda: dw.existing_archive(paths["archive"], world_cfg, arch) is not None,
               lambda: dw.generate_archive(paths["archive"], world_cfg, arch, progress=s.progress))
    out_json = paths["eval"] / "archive.json"

    def archive():
        from geosurge_index.gallery.build import remove_gallery

        index, preds = paths["index"], paths["archive_preds"]
        if _has_gallery(index, "archive"):  # an earlier archive's photos
            remove_gallery(index, "archive")
        geosurge(["gallery", "add", index, paths["archive"] / "tagged", "--name", "archive"])
        if preds.exists():
            shutil.rmtree(preds)
        geosurge(["locate", index, paths["archive"] / "untagged", "--out", preds, "--galleries", "archive",
                  "--save-embeddings"])
        table = {"cell mean (no gallery)": _archive_accuracy(paths, preds, ("cell_lat", "cell_lon")),
                 "its tagged photos as gallery": _archive_accuracy(paths, preds, ("lat", "lon"))}
        if _has_gallery(index, "train"):  # the same embeddings against the training gallery: no re-encoding
            other = paths["eval"] / "archive-train-gallery.parquet"
            geosurge(["search", index, "--embeddings", preds, "--out", other, "--galleries", "train", "--overwrite"])
            table["training set as gallery"] = _archive_accuracy(paths, other, ("lat", "lon"))
        result.archive_table = table
        paths["eval"].mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps({m: {str(int(t)): v for t, v in acc.items()} for m, acc in table.items()},
                                       indent=2) + "\n")
        (paths["eval"] / "archive.txt").write_text(format_table(table, _archive_n(paths)) + "\n")

    runner.run("archive", {"archive": asdict(arch)}, ("export", "world-archive",
                                                      *(("gallery",) if "gallery" in runner.prints else ())),
               out_json.is_file, archive)
    if not result.archive_table and out_json.is_file():
        saved = json.loads(out_json.read_text())
        result.archive_table = {m: {float(t): v for t, v in acc.items()} for m, acc in saved.items()}


def _archive_truth(paths: dict):
    with open(paths["archive"] / "truth.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["tagged"] == "0"]
    return [r["id"] for r in rows], np.array([float(r["lat"]) for r in rows]), np.array([float(r["lon"]) for r in rows])


def _archive_n(paths: dict) -> int:
    return len(_archive_truth(paths)[0])


def _archive_accuracy(paths: dict, preds: Path, columns: tuple[str, str]) -> dict[float, float]:
    """% of the archive's untagged photos within each threshold, by the point in `columns`."""
    import pyarrow.dataset as pads

    from geosurge_index.benchmarks import match_ids
    from geosurge_index.metrics import accuracy_at, haversine_km

    ids, lat, lon = _archive_truth(paths)
    t = pads.dataset(str(preds), format="parquet").to_table(columns=["id", "path", *columns])
    rows = match_ids(ids, t["id"].to_pylist(), t["path"].to_pylist())
    plat = t[columns[0]].to_numpy(zero_copy_only=False).astype(np.float64)
    plon = t[columns[1]].to_numpy(zero_copy_only=False).astype(np.float64)
    take = np.maximum(rows, 0)
    d = np.where(rows >= 0, haversine_km(plat[take], plon[take], lat, lon), np.nan)
    return accuracy_at(d)


def _concrete_recipe(raw: dict, paths: dict, s: DemoSettings, train_split: Path | None = None) -> dict:
    recipe = json.loads(json.dumps(raw))  # deep copy
    data = recipe.setdefault("data", {})
    data.pop("synthetic", None)
    data["cells"] = str(paths["cells"].resolve())
    data["train"] = str(((train_split or paths["train"]) / "manifest.csv").resolve())
    data.setdefault("class_maps", "precomputed")
    recipe["out"] = str(paths["run"].resolve())
    if s.epochs is not None:
        recipe.setdefault("train", {})["epochs"] = s.epochs
    return recipe


def _segmenter_settings(s: DemoSettings):
    from geosurge_index.segmenter_train import SegmenterTrainSettings

    return SegmenterTrainSettings(epochs=s.segmenter_epochs, max_images=s.segmenter_images, seed=s.seed,
                                  progress=s.progress)


def _copy_without_maps(split: Path, dest: Path) -> None:
    """A copy of a world split's photos and manifest without the class-map files (hard links where
    the file system allows)."""
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "images").mkdir(parents=True)
    for img in sorted((split / "images").glob("*.jpg")):
        try:
            os.link(img, dest / "images" / img.name)
        except OSError:
            shutil.copyfile(img, dest / "images" / img.name)
    shutil.copyfile(split / "manifest.csv", dest / "manifest.csv")


def _missing_maps(split: Path) -> bool:
    """Whether some photo of a split has no class map beside it (an interrupted `geosurge segment`)."""
    from geosurge_index.images import class_map_path

    return any(not class_map_path(img).is_file() for img in (split / "images").glob("*.jpg"))


def _best_checkpoint(run_dir: Path) -> Path | None:
    try:
        run = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return None
    name = run.get("best_checkpoint") or run.get("last_checkpoint")
    if not name or not (run_dir / name / "config.json").is_file():
        return None
    return run_dir / name


def _evaluate(paths: dict, s: DemoSettings, runner: _Runner) -> dict[str, dict[float, float]]:
    from geosurge_index.metrics import accuracy_at, haversine_km

    ids, lat, lon = read_manifest_truth(paths["test"] / "manifest.csv")
    table: dict[str, dict[float, float]] = {}
    if "locate" in runner.prints:
        refined = _has_columns(paths["predictions"], ("cell_lat", "cell_lon", "point_source"))
        cols = ("id", "lat", "lon", "embedding", *(("cell_lat", "cell_lon", "point_source") if refined else ()))
        pred = read_predictions(paths["predictions"], ids, cols)
        cell_lat, cell_lon = (pred["cell_lat"], pred["cell_lon"]) if refined else (pred["lat"], pred["lon"])
        table[MODEL_ROW] = accuracy_at(haversine_km(cell_lat, cell_lon, lat, lon))
        if "locate-no-maps" in runner.prints:
            bare = read_predictions(paths["predictions-no-maps"], ids)
            table[NO_MAPS_ROW] = accuracy_at(haversine_km(bare["lat"], bare["lon"], lat, lon))
        if refined and any(v not in (None, "cell_mean") for v in pred["point_source"]):
            table[GALLERY_ROW] = accuracy_at(haversine_km(pred["lat"], pred["lon"], lat, lon))
        emb_rows = [e for e in pred["embedding"] if e is not None]
        if len(emb_rows) == len(ids):
            flat_lat, flat_lon = finest_only_points(paths["index"], paths["cells"], np.array(emb_rows))
            table["same model, finest level"] = accuracy_at(haversine_km(flat_lat, flat_lon, lat, lon))
        else:
            _say(f"  {len(ids) - len(emb_rows)} predictions have no embedding: no finest-level row")
    for name, (plat, plon) in baseline_points(paths["cells"], len(ids), s.seed).items():
        table[name] = accuracy_at(haversine_km(plat, plon, lat, lon))
    return table


def _preview_csv(path: Path, rows: int = 8) -> str:
    try:
        with open(path, newline="") as f:
            lines = [", ".join(r) for _, r in zip(range(rows + 1), csv.reader(f), strict=False)]
    except OSError:
        return ""
    return "\n".join("    " + ln for ln in lines)


def _clean(out: Path) -> None:
    """--fresh: remove what the demo writes (and only that) under OUT."""
    for name in ("world", "cells", "run", "index", "predictions", "eval", "sql", "map", DEMO_STATE,
                 "recipe.toml", "archive-predictions", "segmenter", "predictions-no-maps"):
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _say_confidence(model_json: Path) -> None:
    """The confidence figures of `geosurge eval` (ECE, radius coverage, selective accuracy)."""
    from geosurge_index.reliability import summary_rows

    try:
        conf = json.loads(model_json.read_text()).get("confidence")
    except (OSError, ValueError):
        return
    if conf:
        _say("\nconfidence of the model's answers (eval/confidence.png):")
        for k, v in summary_rows(conf):
            _say(f"  {k:<58} {v}")


def _finish(result: DemoResult, s: DemoSettings) -> None:
    out = s.out_dir
    _say("\n" + "=" * 78)
    if result.table:
        _say(format_table(result.table, s.n_test))
    else:
        _say("no accuracy table: the evaluation did not run (see the stages below)")
    _say_confidence(out / "eval" / "model.json")
    if result.archive_table:
        _say("\npersonal archive: trips of photos within a few km, half of each trip geotagged (EXIF GPS) and "
             "added as a gallery;\nthe other half located with and without it")
        _say(format_table(result.archive_table, _archive_n(result.artefacts)))
    _say("\nstages:")
    for st in result.stages:
        note = f"  ({st.note})" if st.note and st.status != "reused" else ""
        _say(f"  {st.name:<12} {st.status:<11} {st.seconds:7.1f} s{note}")
    total = sum(st.seconds for st in result.stages)
    _say(f"  {'total':<12} {'':<11} {total:7.1f} s")
    _say(f"\nwritten under {out}/:")
    where = [
        ("world/train, world/test", "photos (JPEG), class maps (<stem>.classmap.png), manifest.csv"),
        ("cells/", "the 7-level partition (cells.parquet, assignments.parquet, partition.json)"),
        ("recipe.toml, run/", "the training recipe and the run (epoch checkpoints, metrics.jsonl)"),
        ("segmenter/", "the small segmenter trained on the training photos' class maps"),
        ("index/", "the exported index (FAISS levels, cells.duckdb, encoder with that segmenter, gallery, calibration.json)"),
        ("predictions/", "bulk-locate shards of the test photos (Parquet; lat/lon refined by the training "
                         "gallery, cell_lat/cell_lon the cell means)"),
        ("world/archive", "a personal archive: tagged/ (EXIF GPS), untagged/, truth.csv"),
        ("archive-predictions/", "its untagged photos located with its tagged ones as a gallery"),
        ("predictions-no-maps/", "the same photos without class maps (world/test-no-maps)"),
        ("eval/", "accuracy.txt and accuracy.json (the table above); confidence.png, model.json"),
        ("sql/", "the SQL recipes' results (CSV)"),
        ("map/", "predictions.png: predicted vs true points"),
    ]
    for name, what in where:
        _say(f"  {name:<24} {what}")
    idx, preds, test = out / "index", out / "predictions", out / "world" / "test" / "manifest.csv"
    _say("\nnext:")
    _say(f"  geosurge sql {idx} --predictions {preds} --truth {test} \\\n"
         "      \"SELECT country_name, count(*) FROM predictions p JOIN cells c ON c.level = 7 AND "
         "c.cell_index = p.cell_l7 GROUP BY 1 ORDER BY 2 DESC\"")
    _say(f"  geosurge serve {idx}   # the HTTP service; in another shell:")
    _say(f"      curl -F images=@{out / 'world' / 'test' / 'images' / 'test-000000.jpg'} "
         "http://127.0.0.1:8000/v1/locate")
    _say("      (the service segments uploads with the index's small segmenter, trained on the demo")
    _say("       world's class maps: the table's 'without class maps' row)")
    _say(f"  geosurge locate {idx} YOUR_PHOTOS/ --out my-predictions   # the demo model knows only the demo world")
    _say("  real data and weights: build/mp16.toml (see README, 'Real data and real weights')")
    _say("  run `geosurge demo` again to reuse what is built; `geosurge demo --fresh` redoes it all")


__all__ = ["DemoResult", "DemoSettings", "StageReport", "dump_toml", "format_table", "run_demo"]
