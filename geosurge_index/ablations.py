"""The paper's ablations (its Tables VII/VIII and the choices the paper leaves open), measured on
the procedural demo world: `geosurge ablations` (also `geosurge demo --ablations`).

One world (train + test photos with their class maps) and one partition per number of levels are
made once under OUT; then each *training* (a model config + recipe) runs once per seed, and each
table *row* evaluates one training on the test photos in one way (centre crop or ten-crop;
exhaustive or beam search). Rows that differ only in evaluation share their training. Every cell
of the table is the mean and the spread (sample standard deviation) over seeds of the % of test
photos within 1 / 25 / 200 / 750 / 2500 km.

The groups (the default model is the first row of each group that names it):
- levels trained: 7 / 5 / 3 / 1 levels, i.e. partitions from 7, 5, 3 and 1 of the tau_max
  values (always ending with the finest, so the prediction space is the same cells);
- fusion read-out: the fused CLS alone ("cls"), fused CLS + CLIP's CLS ("cls+clip"), that without
  the self-attention among semantic tokens, that without the LayerNorm on the semantic tokens
  (`fusion.token_norm`), CLIP's CLS attending to semantic and CLIP tokens jointly ("joint"),
  CLIP's CLS + a zero-initialised gate times the fused CLS ("gated"), and no fusion (CLIP alone);
- head: geographic embeddings (7 levels) vs a plain classification head over the finest cells;
- search: the narrow beam (`beam`) vs exhaustive;
- test crops: centre crop vs ten-crop;
- loss negatives: a softmax over all cells of each level vs in-batch InfoNCE.
Rows other than the search group use exhaustive search and the centre crop.

Two worlds (`--world`): "plain", the demo world, whose class maps label only what the pixels show
(a perfect segmenter of the drawn scene, free of the pixels' noise); "map-cues", the same
photos whose class maps also name a fine-grained kind of vegetation and building per place
(`demo_world.WorldConfig.map_cue_levels`), as a segmenter trained on another dataset would: there
the map carries location signal the pixels do not. Each world lives in its own folder under OUT.
`--probe-rolled-maps` also evaluates every training with each test photo's class map swapped for
its neighbour's in the batch: a model that uses the map loses accuracy, one that ignores it does not.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from geosurge_index.demo_world import MAP_CUE_LEVELS
from geosurge_index.errors import UserError

# --- what is trained ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Training:
    """One model to train per seed: a levels count, model-config changes and the loss's negatives."""

    key: str
    levels: int = 7  # how many of the tau_max values (see `level_subset`)
    readout: str | None = None  # None: the model config's default
    self_attention: bool = True
    fusion: bool = True
    head: str = "geo"
    negatives: str = "all"
    token_norm: bool | None = None  # None: the model config's default


@dataclass(frozen=True)
class Row:
    """One row of the table: a training evaluated one way."""

    group: str
    name: str
    training: str
    ten_crop: bool = False
    beam: bool = False  # False: exhaustive search
    rolled_maps: bool = False  # the rolled-map probe: each test photo gets its batch neighbour's class map


TRAININGS = {t.key: t for t in [
    Training("default"),
    Training("levels-5", levels=5),
    Training("levels-3", levels=3),
    Training("levels-1", levels=1),
    Training("readout-cls", readout="cls"),
    Training("readout-cls+clip", readout="cls+clip"),
    Training("readout-cls+clip-no-self-attention", readout="cls+clip", self_attention=False),
    Training("readout-joint", readout="joint"),
    Training("readout-gated", readout="gated"),
    Training("readout-cls+clip-no-token-norm", readout="cls+clip", token_norm=False),
    Training("no-fusion", fusion=False),
    Training("classifier", levels=1, head="classifier"),
    Training("in-batch", negatives="in_batch"),
]}


def rows(beam: int) -> list[Row]:
    return [
        Row("levels trained", "7 levels (default)", "default"),
        Row("levels trained", "5 levels", "levels-5"),
        Row("levels trained", "3 levels", "levels-3"),
        Row("levels trained", "1 level (finest)", "levels-1"),
        Row("fusion read-out", "fused CLS (cls)", "readout-cls"),
        Row("fusion read-out", "fused CLS + CLIP CLS (cls+clip)", "readout-cls+clip"),
        Row("fusion read-out", "cls+clip, no self-attention", "readout-cls+clip-no-self-attention"),
        Row("fusion read-out", "cls+clip, semantic tokens not normed", "readout-cls+clip-no-token-norm"),
        Row("fusion read-out", "joint attention (joint)", "readout-joint"),
        Row("fusion read-out", "gated, gate from 0 (gated)", "readout-gated"),
        Row("fusion read-out", "no fusion (CLIP alone)", "no-fusion"),
        Row("head", "geographic embeddings (default)", "default"),
        Row("head", "classifier over finest cells", "classifier"),
        Row("search", "exhaustive (default rows)", "default"),
        Row("search", f"beam {beam} per level", "default", beam=True),
        Row("test crops", "centre crop (default)", "default"),
        Row("test crops", "ten-crop (paper protocol)", "default", ten_crop=True),
        Row("loss negatives", "all cells of a level (default)", "default"),
        Row("loss negatives", "in-batch InfoNCE", "in-batch"),
    ]


def level_subset(n_levels: int, k: int) -> list[int]:
    """Indices of k of the n tau_max values, evenly spread and always ending with the finest
    (k = 1: the finest alone; k = n: all)."""
    if not 1 <= k <= n_levels:
        raise UserError(f"levels {k}: choose 1..{n_levels}")
    if k == 1:
        return [n_levels - 1]
    return sorted({int(round(x)) for x in np.linspace(0, n_levels - 1, k)})


# --- settings and result -----------------------------------------------------------------------

# The worlds `--world` names: WorldConfig fields beyond the image size.
WORLDS: dict[str, dict] = {
    "plain": {},
    "map-cues": {"map_cue_levels": MAP_CUE_LEVELS},
}


@dataclass(frozen=True)
class AblationSettings:
    out_dir: Path = Path("ablations-out")
    n_train: int = 3000
    n_test: int = 400
    seeds: int = 3
    epochs: int = 3
    beam: int = 4  # cells kept per level in the beam row (the demo's trees are small: a narrow beam)
    world_seed: int = 0
    world: str = "plain"  # a WORLDS key; a world other than "plain" lives in OUT/<world>/
    probe_rolled_maps: bool = False  # also evaluate every row with the class maps rolled in each batch
    recipe: Path = Path("build/demo.toml")  # the model preset and training hyper-parameters
    only: tuple[str, ...] = ()  # row groups to run (empty: all)
    trainings: tuple[str, ...] = ()  # of those rows, the ones of these trainings (TRAININGS keys; empty: all)
    quick: bool = False  # a tiny world, one seed, one optimizer step per training (tests, smoke runs)
    progress: bool = True

    def effective(self) -> AblationSettings:
        if self.quick:
            return replace(self, n_train=min(self.n_train, 240), n_test=min(self.n_test, 24), seeds=1, epochs=1)
        return self

    def __post_init__(self):
        if self.n_train < 50 or self.n_test < 1 or self.seeds < 1 or self.epochs < 1 or self.beam < 1:
            raise UserError("ablations: need --train >= 50, --test >= 1, --seeds >= 1, --epochs >= 1, --beam >= 1")
        _world_fields(self.world)

    @property
    def world_dir(self) -> Path:
        """Where this world's photos, partitions and runs live: OUT for the plain world (as before
        the option), OUT/<world> for another, so that the worlds never mix."""
        return Path(self.out_dir) if self.world == "plain" else Path(self.out_dir) / self.world


@dataclass
class AblationResult:
    settings: dict
    rows: list[dict] = field(default_factory=list)  # group, name, training, per_seed {threshold: [%]}, mean, std
    trainings: dict = field(default_factory=dict)  # key -> {seconds, best_epoch per seed}
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"format": "geosurge-ablations", "format_version": 1, **asdict(self)}


# --- the run -----------------------------------------------------------------------------------


def _say(msg: str) -> None:
    print(msg, flush=True)


def run_ablations(settings: AblationSettings) -> AblationResult:
    """Make the world, train every needed model for every seed, evaluate every row: the table."""
    from geosurge_index.demo import _load_toml, repo_path, scaled_taus
    from geosurge_index.progress import bar
    from geosurge_index.train import model_config_from

    s = settings.effective()
    t_start = time.perf_counter()
    out = s.world_dir
    out.mkdir(parents=True, exist_ok=True)
    raw = _load_toml(repo_path(s.recipe))
    base_config = model_config_from(raw.get("model", {}))
    unknown = [t for t in s.trainings if t not in TRAININGS]
    if unknown:
        raise UserError(f"--trainings {','.join(unknown)}: no such training (trainings: {', '.join(TRAININGS)})")
    table_rows = [r for r in rows(s.beam) if (not s.only or r.group in s.only)
                  and (not s.trainings or r.training in s.trainings)]
    if not table_rows:
        raise UserError(f"--only {','.join(s.only)} --trainings {','.join(s.trainings)}: no row left (groups: "
                        f"{', '.join(dict.fromkeys(r.group for r in rows(s.beam)))})")
    if s.probe_rolled_maps:
        table_rows = [x for r in table_rows for x in (r, replace(r, name=f"{r.name}, maps rolled", rolled_maps=True))]
    needed = list(dict.fromkeys(r.training for r in table_rows))
    tau_min, tau_max = scaled_taus(s.n_train)
    world = _make_world(out, s, base_config.image_size)
    cells_dirs = {k: _partition(out, world["train"], tau_min, tau_max, k)
                  for k in sorted({TRAININGS[t].levels for t in needed})}
    _say(f"ablations ({s.world} world): {len(needed)} trainings x {s.seeds} seed(s) on {s.n_train} training / "
         f"{s.n_test} test "
         f"photos ({base_config.image_size} px), {s.epochs} epoch(s) each{' (quick: one step each)' if s.quick else ''}")

    per_seed: dict[tuple[str, int], dict] = {}
    result = AblationResult(settings={k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()}
                            | {"tau_min": tau_min, "tau_max": list(tau_max)})
    jobs = [(t, seed) for t in needed for seed in range(s.seeds)]
    pbar = bar(total=len(jobs), desc="ablations", unit="model") if s.progress else None
    try:
        for key, seed in jobs:
            if pbar is not None:
                pbar.set_postfix_str(f"{key} seed {seed}")
            tr = TRAININGS[key]
            t0 = time.perf_counter()
            model = _train(out, tr, seed, s, raw, base_config, cells_dirs[tr.levels], world["train"])
            evals = {}
            for r in table_rows:
                if r.training == key:
                    evals[(r.ten_crop, r.beam, r.rolled_maps)] = None
            for ten, beam, rolled in evals:
                evals[(ten, beam, rolled)] = _evaluate(model, cells_dirs[tr.levels], world["test"], ten_crop=ten,
                                                       beam=s.beam if beam else None, roll_maps=rolled)
            per_seed[(key, seed)] = evals
            info = result.trainings.setdefault(key, {"seconds": [], "best_epoch": []})
            info["seconds"].append(round(time.perf_counter() - t0, 1))
            info["best_epoch"].append(model.best_epoch)
            if pbar is not None:
                pbar.update(1)
    finally:
        if pbar is not None:
            pbar.close()

    from geosurge_index.metrics import THRESHOLDS_KM

    for r in table_rows:
        accs = [per_seed[(r.training, seed)][(r.ten_crop, r.beam, r.rolled_maps)] for seed in range(s.seeds)]
        row = {"group": r.group, "name": r.name, "training": r.training, "ten_crop": r.ten_crop,
               "beam": s.beam if r.beam else None, "rolled_maps": r.rolled_maps,
               "per_seed": {}, "mean": {}, "std": {}}
        for t in THRESHOLDS_KM:
            vals = [a[float(t)] for a in accs]
            row["per_seed"][f"{t:g}"] = [round(v, 2) for v in vals]
            row["mean"][f"{t:g}"] = round(float(np.mean(vals)), 2)
            row["std"][f"{t:g}"] = round(float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, 2)
        if r.rolled_maps:  # the probe: the change against the same models with their own maps, paired per seed
            own = [per_seed[(r.training, seed)][(r.ten_crop, r.beam, False)] for seed in range(s.seeds)]
            row["delta_mean"], row["delta_std"] = {}, {}
            for t in THRESHOLDS_KM:
                diff = [a[float(t)] - o[float(t)] for a, o in zip(accs, own, strict=True)]
                row["delta_mean"][f"{t:g}"] = round(float(np.mean(diff)), 2)
                row["delta_std"][f"{t:g}"] = round(float(np.std(diff, ddof=1)) if len(diff) > 1 else 0.0, 2)
        result.rows.append(row)
    result.seconds = round(time.perf_counter() - t_start, 1)
    return result


def world_config(world: str, image_size: int):
    """The demo world `--world` names, at this image size."""
    from geosurge_index import demo_world as dw

    return dw.WorldConfig(image_size=image_size, **_world_fields(world))


def _world_fields(world: str) -> dict:
    if world not in WORLDS:
        raise UserError(f"--world {world}: choose one of {', '.join(WORLDS)}")
    return WORLDS[world]


def _make_world(out: Path, s: AblationSettings, image_size: int) -> dict[str, Path]:
    from geosurge_index import demo_world as dw

    cfg = world_config(s.world, image_size)
    dirs = {"train": out / "world" / "train", "test": out / "world" / "test"}
    for split, n, seed in (("train", s.n_train, s.world_seed), ("test", s.n_test, s.world_seed + 1000)):
        if dw.existing_split(dirs[split], n, seed, cfg, prefix=split) is None:
            dw.generate_split(dirs[split], n, seed, cfg, prefix=split, progress=s.progress)
    return {k: v / "manifest.csv" for k, v in dirs.items()}


def _partition(out: Path, manifest: Path, tau_min: int, tau_max: tuple[int, ...], levels: int) -> Path:
    """The partition of the training locations from `levels` of the tau_max values (made once)."""
    from geosurge_index import cells as cm
    from geosurge_index.coords import read_coordinates

    taus = [tau_max[i] for i in level_subset(len(tau_max), levels)]
    d = out / ("cells-" + "-".join(map(str, [tau_min, *taus])))  # named by its thresholds: made once
    if (d / "partition.json").is_file():
        return d
    coords = read_coordinates(manifest)
    part = cm.partition(coords.lat, coords.lon, cm.PartitionSettings(min(tau_min, taus[-1]), tuple(taus)),
                        source=str(manifest), progress=False)
    cm.write_cells_dir(d, part.cells, part.assignments, coords.rows)
    return d


@dataclass
class _Trained:
    model: object  # GeoSurgeModel, eval mode, the best epoch's weights
    best_epoch: int | None


def _train(out: Path, tr: Training, seed: int, s: AblationSettings, raw: dict, base_config, cells_dir: Path,
           train_manifest: Path) -> _Trained:
    import shutil

    from geosurge_index.model.checkpoint import load_checkpoint
    from geosurge_index.model.config import ModelConfig
    from geosurge_index.train import DataSettings, Recipe, Trainer, TrainSettings, _build

    cfg = ModelConfig.from_dict(base_config.to_dict())
    cfg.fusion.enabled = tr.fusion
    cfg.fusion.self_attention = tr.self_attention
    if tr.readout is not None:
        cfg.fusion.readout = tr.readout
    if tr.token_norm is not None:
        cfg.fusion.token_norm = tr.token_norm
    cfg.head = tr.head
    cfg.validate()
    train_raw = dict(raw.get("train", {}))
    # decoding in-process, and one torch thread unless the recipe says otherwise: on a shared CPU
    # OpenMP threads spin-wait and run many times slower
    train_raw.update(seed=seed, epochs=s.epochs, negatives=tr.negatives, workers=0)
    train_raw.setdefault("threads", 1)
    if s.quick:
        train_raw.update(max_steps_per_epoch=1, batch_size=min(int(train_raw.get("batch_size", 64)), 32),
                         effective_batch=min(int(train_raw.get("effective_batch", 64)), 32))
    ts = _build(TrainSettings, train_raw, "train")
    data = DataSettings(cells=str(cells_dir), train=str(train_manifest), class_maps="precomputed",
                        val_fraction=float(raw.get("data", {}).get("val_fraction", 0.05)))
    run_dir = out / "runs" / f"{tr.key}-seed{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a training is cheap here; a half-written run is not worth resuming
    result = Trainer(Recipe(cfg, data, ts, str(run_dir)), run_dir, progress=False, log=lambda msg: None).run()
    best = run_dir / f"epoch-{result.best_epoch:04d}" if result.best_epoch else result.last_checkpoint
    ckpt = load_checkpoint(best, "cpu")
    return _Trained(ckpt.model, result.best_epoch)


def roll_maps_in_batch(class_maps, has_map):
    """The rolled-map probe's swap: each photo gets the class map (and its has-map flag) of the
    next photo of the batch (`np.roll` by one), its pixels unchanged."""
    if class_maps is None:
        return None, has_map
    return np.roll(class_maps, 1, axis=0), None if has_map is None else np.roll(has_map, 1, axis=0)


def embed_test(model, test, *, ten_crop: bool, roll_maps: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of the test split's photos (rows of `train_data.read_split`) and which decoded;
    `roll_maps` swaps the class maps within each batch of 64 (`roll_maps_in_batch`)."""
    from geosurge_index.locate.decode import DecodeSpec, decode_rows
    from geosurge_index.locate.predictor import Predictor, SearchSettings

    enc = model.encoder
    predictor = Predictor(enc, None, "cpu", SearchSettings(ten_crop=ten_crop))
    spec = DecodeSpec(enc.image_size, ten_crop=ten_crop)
    emb = np.zeros((len(test), enc.embed_dim), np.float32)
    ok = np.zeros(len(test), bool)
    for start in range(0, len(test), 64):
        idx = np.arange(start, min(start + 64, len(test)))
        batch = decode_rows(test.table, idx, spec)
        if batch.ok.any():
            maps, has_map = batch.class_maps, batch.has_map
            if roll_maps:
                maps, has_map = roll_maps_in_batch(maps, has_map)
            emb[idx[batch.ok]] = predictor.encode(batch.pixels, maps, has_map)
        ok[idx] = batch.ok
    return emb, ok


def _evaluate(trained: _Trained, cells_dir: Path, test_manifest: Path, *, ten_crop: bool,
              beam: int | None, roll_maps: bool = False) -> dict[float, float]:
    """% of the test photos within each threshold, for one trained model evaluated one way."""
    import torch

    from geosurge_index.cells import read_cells
    from geosurge_index.index import GeoIndex
    from geosurge_index.metrics import accuracy_at, haversine_km
    from geosurge_index.search import CellTree
    from geosurge_index.train_data import read_split

    model = trained.model
    cells = read_cells(cells_dir)
    test = read_split("test", str(test_manifest), cells)
    emb, ok = embed_test(model, test, ten_crop=ten_crop, roll_maps=roll_maps)
    finest = cells.levels[-1]
    if getattr(model.geo, "is_classifier", False):
        with torch.no_grad():
            best = model.geo.logits(torch.from_numpy(emb), 0).argmax(-1).numpy()
    else:
        with torch.no_grad():
            tables = [t.detach().float().numpy() for t in model.geo.tables]
            temps = model.geo.temperatures.detach().double().numpy()
        tree = CellTree.from_parents([lc.parent_index for lc in cells.levels], [lc.mean_lat for lc in cells.levels],
                                     [lc.mean_lon for lc in cells.levels], [lc.s2_token for lc in cells.levels])
        index = GeoIndex.from_arrays(tables, temps, tree, device="cpu")
        if beam is None:
            res = index.search(emb, top_k=1, exhaustive=True)
        else:
            res = index.search(emb, top_k=1, beam=beam)
        best = res.topk_cells[:, 0]
    d = haversine_km(finest.mean_lat[best], finest.mean_lon[best], test.lat, test.lon)
    d = np.where(ok, d, np.inf)  # an unreadable test photo is a miss
    return accuracy_at(d)


# --- output ------------------------------------------------------------------------------------


def format_table(result: AblationResult) -> str:
    from geosurge_index.metrics import THRESHOLDS_KM

    s = result.settings
    head = f"{'':<36}" + "".join(f"{f'{t:g} km':>14}" for t in THRESHOLDS_KM)
    lines = [f"% of {s['n_test']} test photos within (mean ± spread over {s['seeds']} seed(s)); "
             f"{s['n_train']} training photos, {s['epochs']} epoch(s); {s.get('world', 'plain')} world; "
             f"tau_max {s['tau_max']}",
             head, "-" * len(head)]
    group = None
    for r in result.rows:
        if r["group"] != group:
            group = r["group"]
            lines.append(f"{group}:")
        cells = "".join(f"{r['mean'][f'{t:g}']:>8.1f} ±{r['std'][f'{t:g}']:>4.1f}" for t in THRESHOLDS_KM)
        name = "  maps rolled (probe)" if r.get("rolled_maps") else r["name"]
        lines.append(f"  {name:<34}{cells}")
        if r.get("delta_mean"):
            delta = "".join(f"{r['delta_mean'][f'{t:g}']:>+8.1f} ±{r['delta_std'][f'{t:g}']:>4.1f}"
                            for t in THRESHOLDS_KM)
            lines.append(f"  {'  change (paired per seed)':<34}{delta}")
    lines.append(f"({result.seconds:.0f} s in all; rows sharing a training share its numbers)")
    return "\n".join(lines)


def write_json(result: AblationResult, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result.to_json(), indent=2, default=_jsonable) + "\n")


def _jsonable(x):
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)
