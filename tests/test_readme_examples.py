"""The README's example commands, run for real (issue 14: "The README's example commands are run
by a test").

Every `geosurge ...` line of the README's shell blocks is either run, in README order, against a
small real world (demo-world photos with their class maps, an exported index, its cells folder,
truth files under the README's names, a few photos carrying EXIF GPS), or listed in SKIPPED with
the reason it cannot run here. A command that appears in the README and in neither place fails
the test, so a new example must be made to run or be explained.
"""

from __future__ import annotations

import csv
import re
import shlex
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"

# (subcommand words) -> why it does not run in the test suite.
SKIPPED = {
    ("demo",): "the whole demo: `make demo` and tests/test_demo.py run it",
    ("partition",): "needs MP-16's 4.72 M coordinates (mp16.parquet), not in the repository",
    ("train",): "trains for minutes to days; tests/test_train.py trains the same recipes' code",
    ("export",): "needs a training run's checkpoint; the fixture below exports one the same way",
    ("import",): "downloads CLIP ViT-L/14 (--allow-download); tests/test_geoclip.py imports a config-built one",
    ("bench",): "benchmarks take minutes; tests/test_cli.py and others run their quick modes",
    ("ablations",): "tens of minutes; tests/test_ablations.py runs --quick",
}
# Inputs of examples that stand for data users have and this test does not.
NEEDS = {
    "IMG_0001.heic": "a HEIC photo (tests/test_bulk_faults.py and test_images.py cover HEIC)",
    "manifest.parquet": "a user's manifest with a `key` column (tests/test_sources.py covers manifests)",
    "shards/*.tar": "WebDataset shards (tests/test_sources.py and test_ray.py cover them)",
    "geoclip-index/": "the index `geosurge import geoclip` builds (skipped above: it downloads CLIP)",
    "tagged.csv": "a few hundred of the user's geotagged photos (calibration needs 20 or more; "
                  "tests/test_calibration.py fits one)",
    "runs/mp16/calibration.csv": "a training run's calibration split (training is skipped above; "
                                 "tests/test_train.py writes one, tests/test_calibration.py fits it)",
}


def readme_commands() -> list[list[str]]:
    """The `geosurge` command lines of the README's ```sh blocks, continuation lines joined."""
    out, block, pending = [], False, ""
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            block = not block
            continue
        if not block:
            continue
        line = pending + line
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        pending = ""
        words = shlex.split(line, comments=True)
        if words and words[0] == "geosurge":
            out.append(words[1:])
    return out


def skip_reason(argv: list[str]) -> str | None:
    if (argv[0],) in SKIPPED:
        return SKIPPED[(argv[0],)]
    for needle, why in NEEDS.items():
        if needle in argv:
            return why
    if "--ray" in argv:
        return "a Ray cluster (tests/test_ray.py runs a local one)"
    return None


def _exif_gps_jpeg(src: Path, dst: Path, lat: float, lon: float) -> None:
    """A copy of a JPEG carrying EXIF GPS (what a phone writes), for `eval --truth exif`."""
    from PIL import Image, TiffImagePlugin

    R = TiffImagePlugin.IFDRational

    def dms(x: float) -> tuple:
        x = abs(x)
        d = int(x)
        m = int((x - d) * 60)
        return (R(d, 1), R(m, 1), R(round(((x - d) * 60 - m) * 60 * 10000), 10000))

    exif = Image.Exif()
    exif[0x8825] = {1: "N" if lat >= 0 else "S", 2: dms(lat), 3: "E" if lon >= 0 else "W", 4: dms(lon)}
    Image.open(src).save(dst, exif=exif.tobytes(), quality=90)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder laid out as the README's examples expect: index/, cells/, photos/, truth files,
    queries/, selection.txt (written after the review step)."""
    from geosurge_index.demo_world import generate_split
    from geosurge_index.synthetic import random_index

    root = tmp_path_factory.mktemp("readme")
    index = random_index(root / "index", n_points=1500, place_names=True)
    shutil.copytree(index.with_name(index.name + ".build") / "cells", root / "cells")
    split = root / "world"
    generate_split(split, 12, seed=3, progress=False)
    photos = root / "photos"
    photos.mkdir()
    rows = list(csv.DictReader((split / "manifest.csv").open()))
    from geosurge_index.index import IndexCells

    with IndexCells.open(index) as cells:  # gallery references must lie inside the index's cells
        tree = cells.tree()
    inside = [(float(tree.mean_lat[-1][i]), float(tree.mean_lon[-1][i])) for i in range(len(rows))]
    for i, row in enumerate(rows):
        src = split / row["path"]
        if i < 4:  # a few photos carry the archive's own GPS
            _exif_gps_jpeg(src, photos / src.name, *inside[i])
        else:
            shutil.copy(src, photos / src.name)
        shutil.copy(src.with_name(src.stem + ".classmap.png"), photos / (src.stem + ".classmap.png"))
    truth = [{"id": Path(r["path"]).stem, "lat": r["lat"], "lon": r["lon"]} for r in rows]
    for name in ("im2gps3k_places365.csv", "yfcc4k.csv", "truth.csv", "test.csv"):
        with (root / name).open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["id", "lat", "lon"])
            w.writeheader()
            w.writerows(truth)
    with (root / "train.csv").open("w", newline="") as f:  # a manifest with path, lat, lon (galleries)
        w = csv.DictWriter(f, fieldnames=["path", "lat", "lon", "id"])
        w.writeheader()
        w.writerows({"path": str(photos / Path(r["path"]).name), "lat": la, "lon": lo,
                     "id": Path(r["path"]).stem} for r, (la, lo) in zip(rows, inside, strict=True))
    untagged = root / "untagged"
    untagged.mkdir()
    for src in sorted(photos.glob("*.jpg"))[4:]:
        shutil.copy(src, untagged / src.name)
    (root / "queries").symlink_to(REPO / "queries")
    (root / "build").symlink_to(REPO / "build")
    return root


def _sandboxed(argv: list[str]) -> list[str]:
    out = []
    for a in argv:
        a = a.replace("~/Pictures", "photos/")
        out.append(a)
    return out


@pytest.mark.slow
def test_every_readme_example_runs_or_says_why_not(world, monkeypatch, capsys):
    from geosurge_index.cli import main

    commands = readme_commands()
    assert len(commands) > 25  # the README's examples were found
    monkeypatch.chdir(world)
    monkeypatch.setenv("GEOSURGE_NO_PROGRESS", "1")
    ran, skipped, locate_runs = [], [], 0
    for argv in commands:
        why = skip_reason(argv)
        if why is not None:
            skipped.append((argv, why))
            continue
        argv = _sandboxed(argv)
        if argv[0] == "locate":
            # every example writes preds/: each run gets its own folder (a rerun with other settings
            # is refused, as it should be), and the commands after it read that one
            if locate_runs and Path("preds").exists():
                shutil.rmtree("preds")
            locate_runs += 1
            argv = [*argv, "--device", "cpu", "--workers", "0"]
        if argv[:2] == ["gallery", "add"] and "preds/" in argv:
            # the example's PRED_DIR was written with --save-embeddings (as its comment says)
            if not Path("preds-emb").exists():
                assert main(["locate", "index/", "photos/", "--out", "preds-emb/", "--save-embeddings",
                             "--device", "cpu", "--workers", "0"]) == 0
            argv = ["preds-emb/" if a == "preds/" else a for a in argv]
        if argv[0] == "sidecars" and not Path("selection.txt").exists():
            # the list `geosurge review` exports: ids, one per line
            import pyarrow.dataset as ds

            ids = ds.dataset("preds", format="parquet").to_table(columns=["id"]).column("id").to_pylist()
            Path("selection.txt").write_text("\n".join(ids) + "\n")
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 0, f"`geosurge {' '.join(argv)}` exited {code}:\n{err[-3000:]}"
        ran.append(argv)
    print("ran:", *[" ".join(a) for a in ran], sep="\n  ")
    names = {a[0] for a in ran}
    assert {"locate", "sql", "eval", "coverage", "map", "review", "sidecars", "model-info"} <= names, names
    for argv, why in skipped:
        assert why, f"`geosurge {' '.join(argv)}` is skipped without a reason"
    assert re.search(r"\S", Path("eiffel.csv").read_text())  # the --output of the SQL example
