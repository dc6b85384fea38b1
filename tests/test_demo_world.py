"""The demo world: deterministic, labelled with documented ADE20K ids, location-dependent, MP-16 dense."""

from __future__ import annotations

import csv
import hashlib

import numpy as np
import pytest
from PIL import Image

from geosurge_index import demo_world as dw
from geosurge_index import s2
from geosurge_index.images import class_map_path, load_class_map
from geosurge_index.sampler import mp16_cells, sample_mp16_like

CFG = dw.WorldConfig(image_size=32)


def _digest(directory) -> dict[str, str]:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(tmp_path):
    a = dw.generate_split(tmp_path / "a", 10, seed=3, cfg=CFG, progress=False)
    b = dw.generate_split(tmp_path / "b", 10, seed=3, cfg=CFG, batch_size=4, progress=False)  # other batching
    c = dw.generate_split(tmp_path / "c", 10, seed=4, cfg=CFG, progress=False)
    da, db, dc = _digest(a.directory), _digest(b.directory), _digest(c.directory)
    assert len(da) == 10 * 2 + 2  # JPEG + class map per photo, manifest.csv, world.json
    assert da == db
    assert da["manifest.csv"] != dc["manifest.csv"]
    assert da["images/img-000000.jpg"] != dc["images/img-000000.jpg"]


def test_manifest_and_files_match_the_contract(tmp_path):
    split = dw.generate_split(tmp_path / "w", 12, seed=1, cfg=CFG, prefix="train", progress=False)
    rows = list(csv.DictReader(open(split.manifest, newline="")))
    assert list(rows[0]) == ["path", "lat", "lon", "id"]
    assert [r["id"] for r in rows] == [f"train-{i:06d}" for i in range(12)]
    lat, lon = sample_mp16_like(12, 1)
    np.testing.assert_allclose([float(r["lat"]) for r in rows], lat, atol=1e-6)
    np.testing.assert_allclose([float(r["lon"]) for r in rows], lon, atol=1e-6)
    documented = set(dw.CLASS_IDS.values())
    for r in rows:
        img = Image.open(split.directory / r["path"])
        assert img.format == "JPEG" and img.size == (32, 32) and img.mode == "RGB"
        cmap = Image.open(class_map_path(split.directory / r["path"]))
        assert cmap.format == "PNG" and cmap.mode == "L" and cmap.size == img.size
        ids = set(np.unique(np.asarray(cmap)).tolist())
        assert ids <= documented and dw.CLASS_IDS["sky"] in ids
        assert load_class_map(class_map_path(split.directory / r["path"]), 32).shape == (32, 32)
    # A finished split is recognised and reused; other parameters are not mistaken for it.
    assert dw.existing_split(split.directory, 12, 1, CFG, prefix="train") == split
    assert dw.existing_split(split.directory, 12, 2, CFG, prefix="train") is None
    assert dw.existing_split(split.directory, 13, 1, CFG, prefix="train") is None
    assert dw.existing_split(split.directory, 12, 1, dw.WorldConfig(image_size=48), prefix="train") is None


def test_class_ids_are_ade20k_names():
    # 0-based SceneParse150 ids (OneFormer's id2label); snow uses "land" (94), documented.
    expected = {"building": 1, "sky": 2, "tree": 4, "road": 6, "grass": 9, "mountain": 16,
                "water": 21, "sea": 26, "sand": 46, "palm": 72, "snow": 94,
                "plant": 17, "flower": 66, "hovel": 79, "tower": 84, "house": 25, "skyscraper": 48}
    assert {k: dw.CLASS_IDS[k] for k in expected} == expected
    assert all(0 <= v < 150 for v in dw.CLASS_IDS.values())


def test_class_map_labels_what_is_drawn():
    lat = np.array([-33.87, 64.1, 48.86, 25.2])
    lon = np.array([151.2, -21.9, 2.35, 55.27])
    rgb, cls = dw.render(lat, lon, dw.photo_keys(0, np.arange(4)), CFG)
    assert rgb.shape == (4, 32, 32, 3) and rgb.dtype == np.uint8
    assert cls.shape == (4, 32, 32) and cls.dtype == np.uint8
    sky = cls == dw.CLASS_IDS["sky"]
    # Sky is the top rows and is bluer than average; the bottom row is never sky.
    assert sky[:, 0, :].all() and not sky[:, -1, :].any()


def _features(rgb: np.ndarray, cls: np.ndarray) -> np.ndarray:
    """Per photo: what is in view (class histogram) and the colours of sky and ground."""
    hist = np.stack([(cls == c).mean(axis=(1, 2)) for c in sorted(dw.CLASS_IDS.values())], axis=1)
    q = rgb.shape[1] // 4
    colours = np.concatenate([rgb[:, :q].mean(axis=(1, 2)), rgb[:, -q:].mean(axis=(1, 2))], axis=1) / 255.0
    return np.concatenate([2 * hist, colours], axis=1)


def test_location_changes_content():
    """Photos from far-apart places differ more, on average, than photos from nearby places."""
    n = 96
    lat, lon = sample_mp16_like(n, seed=11)
    rng = np.random.default_rng(0)
    near_lat = np.clip(lat + rng.normal(0, 0.01, n), -89, 89)  # about 1 km away
    near_lon = lon + rng.normal(0, 0.01, n)
    far = rng.permutation(n)  # another MP-16 place, typically thousands of km away
    keys_a, keys_b = dw.photo_keys(1, np.arange(n)), dw.photo_keys(2, np.arange(n))  # independent photos
    fa = _features(*dw.render(lat, lon, keys_a, CFG))
    fn = _features(*dw.render(near_lat, near_lon, keys_b, CFG))
    ff = _features(*dw.render(lat[far], lon[far], keys_b, CFG))
    near = np.abs(fa - fn).sum(1).mean()
    far_d = np.abs(fa - ff).sum(1).mean()
    assert far_d > 1.15 * near, (near, far_d)  # 1.25-1.4 over seeds


def test_fine_cue_follows_s2_cells():
    """The signboard's tile colours are a function of the S2 cells at the signature levels."""
    lat = np.array([48.8566, 48.8566 + 1e-6, -33.8688])
    lon = np.array([2.3522, 2.3522, 151.2093])
    places = dw.describe_places(lat, lon, CFG)
    assert (places.tiles[0] == places.tiles[1]).all()  # same cells at every signature level
    leaf = s2.latlon_to_leaf_ids(lat, lon)
    same_cell = [s2.parent_ids(leaf[:1], lv)[0] == s2.parent_ids(leaf[2:], lv)[0] for lv in CFG.signature_levels]
    assert not any(same_cell) and (places.tiles[0] != places.tiles[2]).any()


@pytest.mark.parametrize("level", [2, 4])
def test_density_follows_the_shipped_mp16_table(tmp_path, level):
    """Coordinates written by the generator spread over S2 cells like MP-16's images do."""
    split = dw.generate_split(tmp_path / "d", 40, seed=7, cfg=CFG, progress=False)
    rows = list(csv.DictReader(open(split.manifest, newline="")))
    lat = np.array([float(r["lat"]) for r in rows])
    np.testing.assert_allclose(lat, sample_mp16_like(40, 7)[0], atol=1e-6)  # the manifest is the sampler's

    # The sampler's density, checked on many more points (cheap: no rendering).
    n = 20000
    lat, lon = sample_mp16_like(n, seed=11)
    ids, counts = mp16_cells()
    order = np.argsort(ids)
    ids, counts = ids[order], counts[order]
    leaf = s2.latlon_to_leaf_ids(lat, lon)
    cell = np.searchsorted(s2.range_min(ids), leaf, side="right") - 1
    assert (leaf <= s2.range_max(ids)[cell]).all()  # every point lies in a cell of the table
    # Compare shares per S2 cell at `level` (table cells coarser than that stay whole).
    group = s2.parent_ids(ids, np.minimum(level, s2.levels(ids)))
    keys, gi = np.unique(group, return_inverse=True)
    expected = np.bincount(gi, weights=counts, minlength=len(keys)) / counts.sum()
    observed = np.bincount(gi[cell], minlength=len(keys)) / n
    tv = 0.5 * np.abs(observed - expected).sum()  # total variation distance
    assert tv < (0.05 if level == 2 else 0.12), tv


def test_map_cues_change_the_class_map_but_not_the_pixels(tmp_path):
    """`map_cue_levels`: vegetation and building pixels are labelled with the place's fine-grained
    kind (a hash of its S2 cell), drawn exactly as before: the RGB is identical, the map is not, and
    the kind is constant within a cell and varies across cells."""
    lat, lon = dw.sample_locations(300, 5)
    keys = dw.photo_keys(5, np.arange(300))
    cued = dw.WorldConfig(image_size=32, map_cue_levels=dw.MAP_CUE_LEVELS)
    rgb0, cls0 = dw.render(lat, lon, keys, CFG)
    rgb1, cls1 = dw.render(lat, lon, keys, cued)
    assert np.array_equal(rgb0, rgb1)  # the pixels cannot tell the kinds apart
    veg0 = np.isin(cls0, [dw.CLASS_IDS["tree"], dw.CLASS_IDS["palm"]])
    bld0 = np.isin(cls0, [dw.CLASS_IDS[k] for k in ("building", "house", "skyscraper")])
    assert np.array_equal(veg0, np.isin(cls1, dw.VEG_KINDS))  # the same regions, relabelled
    assert np.array_equal(bld0, np.isin(cls1, dw.BUILDING_KINDS))
    assert np.array_equal(np.where(veg0 | bld0, 0, cls0), np.where(veg0 | bld0, 0, cls1))  # the rest as before
    assert (cls0 != cls1).any()
    p = dw.describe_places(lat, lon, cued)
    for kind, region, lv in ((p.veg_kind, veg0, dw.MAP_CUE_LEVELS[0]), (p.building_kind, bld0, dw.MAP_CUE_LEVELS[1])):
        has = region.any(axis=(1, 2))
        # each photo's region carries its place's kind, and only it
        assert all(set(np.unique(cls1[i][region[i]]).tolist()) == {int(kind[i])} for i in np.flatnonzero(has))
        cells = s2.parent_ids(p.leaf, lv)
        for c in np.unique(cells):  # one kind per S2 cell
            assert len(set(kind[cells == c].tolist())) == 1
        assert len(set(kind[has].tolist())) >= 3  # and several kinds across the world
    assert set(dw.VEG_KINDS.tolist()) | set(dw.BUILDING_KINDS.tolist()) <= set(dw.CLASS_IDS.values())
    # Part of the world's identity (a cued split is not the plain one), absent from the plain one's.
    split = dw.generate_split(tmp_path / "w", 4, seed=1, cfg=cued, progress=False)
    assert dw.existing_split(split.directory, 4, 1, cued) == split
    assert dw.existing_split(split.directory, 4, 1, CFG) is None
    assert "map_cue_levels" not in dw._split_identity(4, 1, CFG, "img")["config"]
    with pytest.raises(dw.UserError, match="map_cue_levels"):
        dw.WorldConfig(map_cue_levels=(4,))
