"""The end-to-end demo: every stage of the system on the procedural demo world, on a CPU.

    world (train + test photos) -> partition -> train -> export -> locate -> evaluate -> sql -> map

Each stage runs the project's own code (the Python API or the `geosurge` subcommand a user would
type, printed as it runs) and writes under OUT (default ./demo-out). A stage is skipped when its
outputs exist and were made from the same inputs and settings (a fingerprint per stage, kept in
OUT/.demo/); `fresh=True` redoes everything. A stage that is not available in this install, or
fails, is reported plainly and the stages that do not depend on it still run.

The result is one table: % of test photos within 1 / 25 / 200 / 750 / 2500 km for the trained
model, random-cell guessing, always predicting the densest cell, and the same model using the
finest level alone (the paper's depth ablation, on the same embeddings).
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
    image_size: int | None = None  # None: the recipe model's input size
    fresh: bool = False
    progress: bool = True

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
        if c in ("lat", "lon"):
            vals = col.to_numpy(zero_copy_only=False).astype(np.float64)
            out[c] = np.where(take >= 0, vals[np.maximum(take, 0)], np.nan)
        else:
            vals = col.to_pylist()
            out[c] = np.array([vals[t] if t >= 0 else None for t in take], dtype=object)
    return out


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

    head = f"{'method':<28}" + "".join(f"{int(t):>9} km" for t in THRESHOLDS_KM)
    lines = [f"% of {n} test photos within", head, "-" * len(head)]
    for name, acc in table.items():
        lines.append(f"{name:<28}" + "".join(f"{acc[float(t)]:>11.1f}" for t in THRESHOLDS_KM))
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

    # 3. Train the recipe's model on the training photos.
    recipe = _concrete_recipe(raw_recipe, paths, s)

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

    runner.run("train", {"recipe": recipe}, ("world-train", "partition"),
               lambda: _best_checkpoint(paths["run"]) is not None, train)

    # 4. Export the index.
    def export():
        ckpt = _best_checkpoint(paths["run"])
        geosurge(["export", ckpt, "--out", paths["index"], "--overwrite"])

    runner.run("export", {}, ("train",), lambda: (paths["index"] / "manifest.json").is_file(), export)

    # 4b. Calibrate the index's confidence on the photos training held out (RUN_DIR/calibration.csv).
    def calibrate():
        held_out = paths["run"] / "calibration.csv"
        if not held_out.is_file():
            raise _Skip(f"{held_out} is missing (the recipe keeps no calibration split)")
        geosurge(["calibrate", paths["index"], "--truth", held_out])

    runner.run("calibrate", {}, ("export",), lambda: (paths["index"] / "calibration.json").is_file(), calibrate)

    # 5. Geolocate the test photos with the bulk pipeline (embeddings kept for the ablation).
    def locate():
        if paths["predictions"].exists():
            shutil.rmtree(paths["predictions"])
        geosurge(["locate", paths["index"], paths["test"] / "manifest.csv", "--out", paths["predictions"],
                  "--save-embeddings"])

    runner.run("locate", {}, ("export", "world-test", *(("calibrate",) if "calibrate" in runner.prints else ())),
               lambda: any(paths["predictions"].glob("part-*.parquet")), locate)

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
    runner.run("evaluate", {"seed": s.seed, "with_model": have_preds},
               ("partition", "world-test", *(("locate",) if have_preds else ())),
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

    _finish(result, s)
    return result


def _concrete_recipe(raw: dict, paths: dict, s: DemoSettings) -> dict:
    recipe = json.loads(json.dumps(raw))  # deep copy
    data = recipe.setdefault("data", {})
    data.pop("synthetic", None)
    data["cells"] = str(paths["cells"].resolve())
    data["train"] = str((paths["train"] / "manifest.csv").resolve())
    data.setdefault("class_maps", "precomputed")
    recipe["out"] = str(paths["run"].resolve())
    if s.epochs is not None:
        recipe.setdefault("train", {})["epochs"] = s.epochs
    return recipe


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
        pred = read_predictions(paths["predictions"], ids, ("id", "lat", "lon", "embedding"))
        table["GeoSURGE (7-level product)"] = accuracy_at(haversine_km(pred["lat"], pred["lon"], lat, lon))
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
                 "recipe.toml"):
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
            _say(f"  {k:<44} {v}")


def _finish(result: DemoResult, s: DemoSettings) -> None:
    out = s.out_dir
    _say("\n" + "=" * 78)
    if result.table:
        _say(format_table(result.table, s.n_test))
    else:
        _say("no accuracy table: the evaluation did not run (see the stages below)")
    _say_confidence(out / "eval" / "model.json")
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
        ("index/", "the exported index (FAISS levels, cells.duckdb, encoder)"),
        ("predictions/", "bulk-locate shards of the test photos (Parquet)"),
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
    _say("      (the service segments uploads itself, and the demo's tiny segmenter is untrained:")
    _say("       expect worse answers than the bulk run, which read the world's class maps)")
    _say(f"  geosurge locate {idx} YOUR_PHOTOS/ --out my-predictions   # the demo model knows only the demo world")
    _say("  real data and weights: build/mp16.toml (see README, 'Real data and real weights')")
    _say("  run `geosurge demo` again to reuse what is built; `geosurge demo --fresh` redoes it all")


__all__ = ["DemoResult", "DemoSettings", "StageReport", "dump_toml", "format_table", "run_demo"]
