"""The demo world: procedural geotagged photos whose content depends on where they were taken.

Locations follow MP-16's photo density (`geosurge_index.sampler`). What a picture shows is a
function of its location, the way real scenes are, plus per-photo noise:

- climate by latitude and a few real desert regions: snow, desert, tropics, forest, grassland
  (ground, sky, vegetation colours and kinds); mountains where a smooth relief field is high;
- regional building styles by continent-sized region (facade palettes, roof shapes, heights,
  window rhythm), refined by a hash of the S2 level-4 cell (which palette colour dominates);
- coasts: a smooth procedural land/sea field on the sphere decides where the sea is in view
  and on which side;
- local cues at every scale, so that finer cells are learnable: a "signboard" strip of coloured
  tiles (8 colours), tile m coloured by a hash of the photo's S2 cell at `signature_levels[m]`
  (coarse to fine: levels 1, 2, 3, 4, 6, 8, 10, 13, about 5,000 km down to 1 km), and a ground
  texture whose orientation and period come from the S2 level-`texture_level` cell. Like local
  signage, one tile narrows the place only among its parent's children: the code is read
  coarse to fine;
- noise and distractors: season (snow in the mid latitudes), dusk and overcast skies, lighting
  gain and tint, pixel noise, random cars, people and rocks, a foreground occluder, a missing
  signboard (15%) and misread tiles (5% for the coarsest, rising to 30% for the finest: small
  details are the hardest to make out). So the finest level alone does worse than the 7-level
  product, as in the paper's depth ablation.

Every photo comes with a semantic class map in ADE20K ids (0-based, the ids OneFormer-ADE20K
predicts), so that both the RGB path and the fusion path carry signal. ADE20K has no snow
class: snow-covered ground is labelled 94 "land, ground, soil" (a segmenter labels snow fields
as ground), which no other biome uses. See `CLASS_IDS`.

`WorldConfig.map_cue_levels` (off by default; `geosurge ablations --world map-cues`) makes the
class map carry location signal that the pixels lack, the way a real segmenter trained on
another dataset does (OneFormer on ADE20K tells palm from tree, hut from house from skyscraper
where a 64 px geolocation model would have to learn it from pixels). By default the map is
rendered from the same scene the pixels show, so it tells the model nothing the pixels do not,
and fusion has nothing to add. With the option on, every vegetation pixel is labelled with one
of `VEG_KINDS` and every building pixel with one of `BUILDING_KINDS`, chosen by a hash of the
photo's S2 cell at the two levels named: the "fine-grained kind" of the place's plants and
houses, drawn exactly as before (same shapes, same colours, same random draws: the JPEG bytes do
not change, only the class map does).

Rendering is vectorised numpy over batches; per-photo randomness is counter-based (a hash of
seed, photo index and draw number), so photo i is the same bytes whatever the batch size.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from geosurge_index import s2
from geosurge_index.errors import UserError
from geosurge_index.progress import bar

WORLD_FORMAT = "geosurge-demo-world"
WORLD_VERSION = 1

# ADE20K (SceneParse150) ids, 0-based as OneFormer/transformers' id2label numbers them.
CLASS_IDS: dict[str, int] = {
    "building": 1,
    "sky": 2,
    "tree": 4,
    "road": 6,
    "grass": 9,
    "person": 12,
    "mountain": 16,
    "car": 20,
    "water": 21,
    "house": 25,
    "sea": 26,
    "plant": 17,  # "plant, flora, plant life"
    "field": 29,
    "rock": 34,
    "signboard": 43,
    "flower": 66,
    "sand": 46,
    "skyscraper": 48,
    "palm": 72,
    "hovel": 79,  # "hovel, hut, hutch, shack, shanty"
    "tower": 84,
    "snow": 94,  # ADE20K has no snow: 94 is "land, ground, soil"; only snow uses it here
}
_C = CLASS_IDS
# The fine-grained kinds of `WorldConfig.map_cue_levels`: what a segmenter trained elsewhere names
# where the 64 px pixels show one generic tree or building.
VEG_KINDS = np.array([_C["tree"], _C["palm"], _C["plant"], _C["flower"]], np.uint8)
BUILDING_KINDS = np.array([_C["building"], _C["house"], _C["skyscraper"], _C["hovel"], _C["tower"]], np.uint8)

BIOMES = ("snow", "desert", "tropical", "forest", "grassland")
SNOW, DESERT, TROPICAL, FOREST, GRASSLAND = range(5)
GROUND_CLASS = np.array([_C["snow"], _C["sand"], _C["grass"], _C["grass"], _C["field"]], np.uint8)

REGIONS = (
    "europe", "north_america", "latin_america", "africa", "middle_east_south_asia",
    "east_asia", "southeast_asia_oceania", "russia_central_asia",
)


@dataclass(frozen=True)
class WorldConfig:
    """How the world looks. Part of a generated split's identity (world.json)."""

    image_size: int = 64
    # S2 levels of the signboard's tiles, coarse to fine: about 5,000 km down to 10 km, and level 13
    # (about 1 km): a street-level cue, so that answers finer than the finest cell are learnable
    signature_levels: tuple[int, ...] = (1, 2, 3, 4, 6, 8, 10, 13)
    texture_level: int = 9
    jpeg_quality: int = 90
    p_signboard: float = 0.85  # chance the signboard is in view
    # chance a tile shows a random colour, from the coarsest tile to the finest (small details
    # are the hardest to make out: the finest level alone should not be enough)
    p_tile_misread: tuple[float, float] = (0.05, 0.3)
    tile_grid: int = 8  # signboard tiles are 1/tile_grid of the image side, on that grid
    noise_sigma: float = 5.0  # pixel noise, grey levels
    # () = off (the default world). (a, b): vegetation pixels are labelled with one of VEG_KINDS
    # by a hash of the S2 level-a cell, building pixels with one of BUILDING_KINDS by the level-b
    # cell; the pixels stay the same (see the module docstring). In world.json only when set, so
    # splits of the default world keep their identity.
    map_cue_levels: tuple[int, ...] = ()

    def __post_init__(self):
        if not 16 <= self.image_size <= 1024:
            raise UserError(f"image_size {self.image_size}: use 16..1024 pixels")
        if len(self.signature_levels) > self.tile_grid:
            raise UserError("the signboard needs tile_grid >= len(signature_levels)")
        if not all(0 <= lv <= 30 for lv in (*self.signature_levels, self.texture_level)):
            raise UserError("signature_levels and texture_level are S2 levels 0..30")
        if self.map_cue_levels and (len(self.map_cue_levels) != 2
                                    or not all(0 <= lv <= 30 for lv in self.map_cue_levels)):
            raise UserError(f"map_cue_levels {self.map_cue_levels}: give () or two S2 levels 0..30 "
                            "(vegetation, buildings)")


MAP_CUE_LEVELS = (4, 6)  # `geosurge ablations --world map-cues`: about 600 km and 150 km cells


# --------------------------------------------------------------------------------------------
# Counter-based hashing: deterministic per photo and per place, independent of batching.

_U64 = np.uint64


def _mix(x) -> np.ndarray:
    """splitmix64's finaliser: a good 64-bit hash, vectorised (uint64 arithmetic wraps)."""
    x = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _mix_unchecked(x)


def _mix_unchecked(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> _U64(30))
    x = x * _U64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> _U64(27))
    x = x * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def _unit(h: np.ndarray) -> np.ndarray:
    """uint64 hash -> float64 uniform in [0, 1)."""
    return (h >> _U64(11)).astype(np.float64) * (1.0 / (1 << 53))


class _Draws:
    """Per-photo random numbers: draw k of photo i is a hash of (photo key, k)."""

    def __init__(self, keys: np.ndarray):
        self.keys = keys
        self.counter = 0

    def uniform(self, *shape: int, low: float = 0.0, high: float = 1.0) -> np.ndarray:
        n = int(np.prod(shape)) if shape else 1
        ctr = _mix(np.arange(self.counter, self.counter + n, dtype=np.uint64) + _U64(0x5EED))
        self.counter += n
        u = _unit(_mix(self.keys[:, None] ^ ctr[None, :])).reshape(len(self.keys), *shape)
        return low + (high - low) * u

    def normal(self, *shape: int, scale: float = 1.0) -> np.ndarray:
        u1, u2 = self.uniform(*shape), self.uniform(*shape)
        return scale * np.sqrt(-2.0 * np.log1p(-u1)) * np.cos(2 * np.pi * u2)

    def below(self, p) -> np.ndarray:
        return self.uniform() < p


def photo_keys(seed: int, index: np.ndarray) -> np.ndarray:
    return _mix(_mix(_U64(seed & 0xFFFFFFFFFFFFFFFF) + _U64(0xA5A5)) ^ np.asarray(index, np.uint64))


# --------------------------------------------------------------------------------------------
# Places: S2 cells, smooth fields on the sphere, climate and region.


def place_hash(leaf: np.ndarray, level: int, salt: int) -> np.ndarray:
    return _mix(s2.parent_ids(leaf, level) ^ _mix(_U64(salt)))


def smooth_field(xyz: np.ndarray, salt: int, freq: tuple[float, float], n_waves: int = 8) -> np.ndarray:
    """A smooth random field on the sphere (roughly unit variance): a sum of plane waves.

    Wavelength 2*pi/freq radians of arc (freq 6: about 6,700 km; freq 40: about 1,000 km).
    """
    rng = np.random.default_rng(salt)  # fixed world constants, not per-photo randomness
    dirs = rng.normal(size=(n_waves, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    freqs = rng.uniform(freq[0], freq[1], n_waves)
    phases = rng.uniform(0, 2 * np.pi, n_waves)
    return np.sin((xyz @ dirs.T) * freqs + phases).sum(-1) / math.sqrt(n_waves / 2)


# Real deserts, roughly: (lat_min, lat_max, lon_min, lon_max).
_DESERTS = np.array([
    (15, 32, -17, 35),  # Sahara
    (14, 32, 35, 60),  # Arabia
    (24, 38, 50, 72),  # Iran, Thar
    (24, 38, -118, -103),  # Sonora, Mojave
    (-32, -19, 118, 144),  # inner Australia
    (-30, -17, -72, -68),  # Atacama
    (-28, -19, 14, 25),  # Kalahari, Namib
    (37, 47, 88, 112),  # Gobi, Taklamakan
])

# Regions in priority order: (region, lat_min, lat_max, lon_min, lon_max); first match wins.
_REGION_BOXES = [
    (5, 18, 55, 97, 150),  # East Asia
    (4, 5, 42, 34, 97),  # Middle East, South Asia
    (0, 35, 72, -25, 45),  # Europe
    (7, 40, 80, 45, 180),  # Russia, Central Asia
    (3, -36, 37, -20, 52),  # Africa
    (2, 14, 33, -118, -86),  # Mexico (Latin style)
    (1, 14, 85, -170, -50),  # North America
    (2, -60, 33, -120, -30),  # Latin America
    (6, -50, 18, 90, 180),  # Southeast Asia, Oceania
]


def region_of(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    region = np.full(len(lat), 6, dtype=np.int64)
    done = np.zeros(len(lat), dtype=bool)
    for r, a0, a1, o0, o1 in _REGION_BOXES:
        m = ~done & (lat >= a0) & (lat < a1) & (lon >= o0) & (lon < o1)
        region[m] = r
        done |= m
    return region


# Regional building styles: 4 facade colours, roof colour, roof kind weights (flat, pitched,
# dome), height range (fraction of the image), window period (pixels at 64 px), chance of towers.
_FACADES = np.array([
    [(232, 220, 190), (214, 170, 120), (245, 240, 230), (190, 120, 90)],  # europe
    [(200, 195, 185), (150, 80, 60), (235, 235, 235), (120, 130, 140)],  # north america
    [(240, 150, 170), (250, 215, 90), (80, 200, 190), (245, 245, 235)],  # latin america
    [(190, 130, 80), (220, 180, 130), (160, 100, 60), (235, 225, 200)],  # africa
    [(235, 220, 180), (250, 250, 245), (210, 180, 130), (180, 200, 220)],  # middle east / s asia
    [(180, 185, 190), (240, 240, 240), (110, 150, 190), (200, 160, 150)],  # east asia
    [(240, 230, 200), (170, 210, 170), (230, 190, 160), (200, 200, 210)],  # se asia / oceania
    [(170, 170, 165), (210, 200, 180), (140, 150, 160), (200, 120, 110)],  # russia / c asia
], dtype=np.float32)
_ROOFS = np.array([(170, 70, 50), (80, 80, 90), (120, 100, 90), (130, 90, 60),
                   (220, 210, 190), (60, 70, 80), (160, 60, 50), (70, 110, 80)], dtype=np.float32)
_ROOF_KIND_P = np.array([(0.2, 0.8, 0.0), (0.5, 0.5, 0.0), (0.8, 0.2, 0.0), (0.9, 0.1, 0.0),
                         (0.6, 0.0, 0.4), (0.6, 0.3, 0.1), (0.5, 0.4, 0.1), (0.7, 0.1, 0.2)])
_HEIGHTS = np.array([(0.12, 0.30), (0.10, 0.55), (0.08, 0.22), (0.06, 0.18),
                     (0.08, 0.28), (0.15, 0.60), (0.10, 0.40), (0.15, 0.45)])
_WINDOW_PERIOD = np.array([7.0, 6.0, 8.0, 9.0, 7.5, 5.0, 6.5, 5.5])

# Per biome: sky top, sky at the horizon, ground colour, vegetation colour, sea colour.
_SKY_TOP = np.array([(150, 170, 200), (120, 170, 230), (40, 110, 210), (70, 130, 210), (90, 150, 220)], np.float32)
_SKY_HOR = np.array([(225, 230, 240), (240, 225, 200), (170, 215, 240), (200, 220, 240), (215, 225, 235)], np.float32)
_GROUND = np.array([(238, 240, 246), (222, 188, 128), (50, 150, 55), (85, 140, 65), (175, 165, 95)], np.float32)
_VEG = np.array([(30, 70, 45), (110, 120, 60), (25, 120, 40), (40, 100, 45), (90, 130, 60)], np.float32)
_SEA = np.array([(60, 80, 100), (30, 110, 160), (20, 170, 180), (40, 90, 140), (50, 100, 150)], np.float32)
_MOUNTAIN = np.array([(120, 125, 140), (170, 110, 70), (70, 110, 80), (100, 110, 120), (130, 120, 110)], np.float32)

# Signboard tile colours: far apart in RGB so that JPEG and lighting keep them apart.
_TILES = np.array([(220, 30, 30), (30, 180, 40), (30, 60, 220), (240, 220, 30),
                   (210, 40, 200), (30, 210, 220), (250, 250, 250), (20, 20, 20)], np.float32)


@dataclass
class Places:
    """What a location implies, per photo (arrays of shape (n,))."""

    lat: np.ndarray
    lon: np.ndarray
    leaf: np.ndarray  # uint64 S2 leaf ids
    region: np.ndarray
    desert: np.ndarray
    p_snow: np.ndarray
    tropical: np.ndarray
    forest_score: np.ndarray
    relief: np.ndarray
    coastal: np.ndarray
    sea_left: np.ndarray
    p_urban: np.ndarray
    facade_index: np.ndarray  # preferred palette colour (S2 level 4)
    tint: np.ndarray  # (n, 3) regional colour shift (S2 level 6)
    tiles: np.ndarray  # (n, len(signature_levels)) tile colour index
    texture_angle: np.ndarray
    texture_period: np.ndarray
    veg_kind: np.ndarray | None = None  # ADE20K id of the place's vegetation (map_cue_levels only)
    building_kind: np.ndarray | None = None  # ADE20K id of the place's buildings (map_cue_levels only)


def describe_places(lat: np.ndarray, lon: np.ndarray, cfg: WorldConfig) -> Places:
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    leaf = s2.latlon_to_leaf_ids(lat, lon)
    xyz = s2.latlon_to_xyz(lat, lon)
    abslat = np.abs(lat)
    in_box = np.zeros(len(lat), dtype=bool)
    for a0, a1, o0, o1 in _DESERTS:
        in_box |= (lat >= a0) & (lat < a1) & (lon >= o0) & (lon < o1)
    arid = smooth_field(xyz, 11, (3, 12))
    desert = (in_box & (arid > -1.0)) | ((abslat > 18) & (abslat < 36) & (arid > 1.4))
    relief = smooth_field(xyz, 12, (5, 25))
    p_snow = np.clip((abslat - 47) / 22, 0, 1) + 0.35 * (relief > 0.8) * (abslat > 28)
    coast = smooth_field(xyz, 14, (15, 60))
    h_urban = _unit(place_hash(leaf, 7, 21))
    h4 = place_hash(leaf, 4, 22)
    h6 = _unit(np.stack([place_hash(leaf, 6, 23 + k) for k in range(3)], axis=1))
    tiles = np.stack([place_hash(leaf, lv, 100 + lv) % _U64(len(_TILES)) for lv in cfg.signature_levels],
                     axis=1).astype(np.int64)
    tex = place_hash(leaf, cfg.texture_level, 40)
    veg_kind = building_kind = None
    if cfg.map_cue_levels:
        lv_veg, lv_bld = cfg.map_cue_levels
        veg_kind = VEG_KINDS[(place_hash(leaf, lv_veg, 50) % _U64(len(VEG_KINDS))).astype(np.int64)]
        building_kind = BUILDING_KINDS[(place_hash(leaf, lv_bld, 51) % _U64(len(BUILDING_KINDS))).astype(np.int64)]
    return Places(
        lat=lat, lon=lon, leaf=leaf, region=region_of(lat, lon), desert=desert,
        p_snow=np.where(desert, 0.0, np.clip(p_snow, 0, 1)),
        tropical=(abslat < 23) & ~desert,
        forest_score=smooth_field(xyz, 13, (3, 15)),
        relief=relief,
        coastal=np.abs(coast) < 0.35,
        sea_left=smooth_field(xyz, 15, (4, 20)) > 0,
        p_urban=np.where(h_urban < 0.4, 0.1, 0.85),  # towns and countryside
        facade_index=(h4 % _U64(4)).astype(np.int64),
        tint=(h6 - 0.5) * 40.0,
        tiles=tiles,
        texture_angle=(tex % _U64(4)).astype(np.float64) * (np.pi / 4),
        texture_period=np.array([4.0, 6.0, 9.0])[((tex >> _U64(8)) % _U64(3)).astype(np.int64)],
        veg_kind=veg_kind, building_kind=building_kind,
    )


# --------------------------------------------------------------------------------------------
# Rendering.


class _Canvas:
    def __init__(self, n: int, size: int):
        self.rgb = np.zeros((n, size, size, 3), dtype=np.float32)
        self.cls = np.zeros((n, size, size), dtype=np.uint8)
        g = (np.arange(size, dtype=np.float32) + 0.5) / size
        self.y = g[None, :, None]  # (1, S, 1), 0 at the top
        self.x = g[None, None, :]  # (1, 1, S)
        self.size = size

    def paint(self, mask: np.ndarray, class_id, colour: np.ndarray) -> None:
        """mask broadcastable to (n, S, S); class_id scalar or (n,); colour (n, 3) or (n, S, S, 3)."""
        mask = np.broadcast_to(mask, self.cls.shape)
        class_id = np.asarray(class_id, dtype=np.uint8).reshape(-1, 1, 1)
        np.copyto(self.cls, class_id, where=mask)  # in place: no full-size temporaries
        if colour.ndim == 2:
            colour = colour[:, None, None, :]
        np.copyto(self.rgb, colour, where=mask[..., None], casting="unsafe")


def _col(v: np.ndarray) -> np.ndarray:
    """(n,) per-photo values -> (n, 1, 1), floats as float32 (the canvas' precision)."""
    v = np.asarray(v)
    return (v.astype(np.float32) if v.dtype.kind == "f" else v)[:, None, None]


def render(lat: np.ndarray, lon: np.ndarray, keys: np.ndarray, cfg: WorldConfig,
           places: Places | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Photos at (lat, lon) -> (rgb uint8 (n, S, S, 3), class map uint8 (n, S, S)).

    `keys` (uint64 (n,), from `photo_keys`) seed each photo's own randomness.
    """
    p = places if places is not None else describe_places(lat, lon, cfg)
    n, S = len(keys), cfg.image_size
    d = _Draws(np.asarray(keys, dtype=np.uint64))
    cv = _Canvas(n, S)
    x, y = cv.x, cv.y

    # Biome: season (snow), then climate.
    snow = d.below(p.p_snow)
    forest = (p.forest_score + d.normal(scale=0.5)) > 0.0
    biome = np.select([snow, p.desert, p.tropical, forest], [SNOW, DESERT, TROPICAL, FOREST], GRASSLAND)

    # Sky, with dusk and overcast variations.
    horizon = d.uniform(low=0.40, high=0.58)
    sky_top, sky_hor = _SKY_TOP[biome].copy(), _SKY_HOR[biome].copy()
    dusk = d.below(0.12)
    overcast = d.below(np.where((biome == SNOW) | (biome == FOREST), 0.25, 0.1)) & ~dusk
    sky_top[dusk], sky_hor[dusk] = (70, 60, 120), (250, 150, 80)
    sky_top[overcast], sky_hor[overcast] = (150, 155, 160), (200, 202, 205)
    sky_top += p.tint * 0.5  # regional haze
    t = np.clip(y / _col(horizon), 0, 1)[..., None]  # (n, S, 1, 1)
    sky = sky_top[:, None, None, :] * (1 - t) + sky_hor[:, None, None, :] * t
    cv.paint(np.ones((n, S, S), bool), _C["sky"], np.broadcast_to(sky, (n, S, S, 3)))

    # Mountains behind the horizon where relief is high.
    has_mtn = (p.relief + d.normal(scale=0.3)) > 0.4
    amp = d.uniform(low=0.08, high=0.28)
    f1, f2 = d.uniform(low=1.0, high=3.0), d.uniform(low=3.0, high=7.0)
    ph1, ph2 = d.uniform(high=2 * np.pi), d.uniform(high=2 * np.pi)
    ridge = _col(horizon) - _col(amp) * (
        0.55 + 0.45 * np.sin(2 * np.pi * _col(f1) * x + _col(ph1))) * (
        0.7 + 0.3 * np.sin(2 * np.pi * _col(f2) * x + _col(ph2)))
    mtn = _col(has_mtn) & (y >= ridge) & (y < _col(horizon))
    capped = (biome == SNOW) | ((np.abs(p.lat) > 35) & (p.relief > 0.9))
    cap = _col(capped) & (y < ridge + 0.05)
    mtn_col = _MOUNTAIN[biome][:, None, None, :] * (1 - 0.3 * (y - ridge)[..., None])
    mtn_col = np.where(cap[..., None], np.float32(245), mtn_col)
    cv.paint(mtn, _C["mountain"], mtn_col)

    # Ground, textured by the S2 level-`texture_level` cell.
    ground = y >= _col(horizon)
    ang, period = _col(p.texture_angle), _col(p.texture_period)
    wave = np.sin(2 * np.pi * (x * np.cos(ang) + y * np.sin(ang)) * S / period)
    shade = 1.0 - 0.25 * (1 - y)  # darker towards the horizon
    g_col = (_GROUND[biome] + p.tint)[:, None, None, :] * shade[..., None] + 12.0 * wave[..., None]
    cv.paint(ground, GROUND_CLASS[biome], g_col)

    # Sea on one side where the coast field says so, with a beach.
    sea_w = d.uniform(low=0.25, high=0.6)
    slant = d.uniform(low=-0.3, high=0.3)
    show_sea = p.coastal & d.below(0.75)
    xs = np.where(_col(p.sea_left), x, 1 - x)
    coast_x = _col(sea_w) + (y - _col(horizon)) * _col(slant)
    sea = _col(show_sea) & ground & (xs < coast_x)
    beach = _col(show_sea & (biome != SNOW)) & ground & (xs >= coast_x) & (xs < coast_x + 0.07)
    waves = 10.0 * np.sin(2 * np.pi * y * S / 3.0 + 2 * x)
    cv.paint(sea, _C["sea"], _SEA[biome][:, None, None, :] + waves[..., None])
    cv.paint(beach, _C["sand"], np.broadcast_to(np.float32((225, 205, 150)), (n, 3)).copy())

    # A lake now and then, anywhere (a distractor).
    lake = d.below(0.08)
    lx, ly = d.uniform(low=0.2, high=0.8), _col(horizon) + _col(d.uniform(low=0.1, high=0.3))
    lmask = _col(lake) & ((x - _col(lx)) ** 2 / 0.06 + (y - ly) ** 2 / 0.006 < 1) & ground
    cv.paint(lmask, _C["water"], np.broadcast_to(np.float32((60, 110, 150)), (n, 3)).copy())

    # Buildings in the regional style.
    urban = d.below(p.p_urban) & (biome != SNOW) | d.below(0.05)
    street = horizon + 0.08
    n_b = np.where(urban, 1 + (d.uniform() * 6).astype(int), 0)
    k_b = 6
    widths = d.uniform(k_b, low=0.1, high=0.24)
    gaps = d.uniform(k_b, low=0.0, high=0.07)
    x_left = d.uniform(low=-0.1, high=0.1)[:, None] + np.cumsum(widths + gaps, axis=1) - widths - gaps
    lo_h, hi_h = _HEIGHTS[p.region, 0], _HEIGHTS[p.region, 1]
    tall = d.uniform(k_b) < np.where(p.region[:, None] == 5, 0.3, 0.1)
    heights = lo_h[:, None] + (hi_h - lo_h)[:, None] * d.uniform(k_b) + tall * 0.2
    kind_u = d.uniform(k_b)
    cum = np.cumsum(_ROOF_KIND_P[p.region], axis=1)
    roof_kind = (kind_u > cum[:, :1]).astype(int) + (kind_u > cum[:, 1:2])
    pick_own = d.uniform(k_b) < 0.7
    facade_idx = np.where(pick_own, p.facade_index[:, None], (d.uniform(k_b) * 4).astype(int))
    facade = _FACADES[p.region[:, None], facade_idx] + p.tint[:, None, :]
    facade += d.normal(k_b, 3, scale=10.0)
    window_p = _WINDOW_PERIOD[p.region] * S / 64.0
    lit = dusk
    for j in range(k_b):
        on = _col(n_b > j)
        x0, w, hgt = _col(x_left[:, j]), _col(widths[:, j]), _col(heights[:, j])
        top = _col(street) - hgt
        inside_x = (x >= x0) & (x < x0 + w)
        body = on & inside_x & (y >= top) & (y < _col(street))
        cx = x0 + w / 2
        rk = _col(roof_kind[:, j])
        pitched = (rk == 1) & (y < top) & (y >= top - 0.35 * w * (1 - np.abs(x - cx) / (w / 2)))
        dome = (rk == 2) & (y < top) & (((x - cx) / (0.35 * w)) ** 2 + ((y - top) / (0.3 * w)) ** 2 < 1)
        roof = on & inside_x & (pitched | dome)
        cls = np.where(heights[:, j] > 0.42, _C["skyscraper"],
                       np.where((roof_kind[:, j] == 1) & (heights[:, j] < 0.2), _C["house"], _C["building"]))
        if p.building_kind is not None:
            cls = p.building_kind  # the place's kind, whatever the shape (map_cue_levels)
        wp = _col(window_p)
        px, py = (x - x0) * S, (y - top) * S
        window = body & ((px % wp) < wp * 0.5) & ((py % wp) < wp * 0.55) & (px > 1) & (px < w * S - 1)
        wcol = np.where(lit[:, None], np.float32((250, 210, 120)), np.float32((60, 70, 90)))
        body_col = np.where(window[..., None], wcol[:, None, None, :], facade[:, j][:, None, None, :])
        cv.paint(body, cls, body_col)
        cv.paint(roof, cls, _ROOFS[p.region] + p.tint * 0.5)

    # A road in front of most towns.
    road = _col(urban & d.below(0.8)) & (y >= _col(street + d.uniform(low=0.08, high=0.25)))
    dash = (np.abs(x - 0.5) < 0.015) & ((np.floor(y * S / 4) % 2) == 0)
    road_col = np.where(dash[..., None], np.float32(235), np.float32(85))
    cv.paint(road, _C["road"], np.broadcast_to(road_col, (n, S, S, 3)))

    # Vegetation: trees (conifers in the cold), palms in the tropics.
    n_t = np.select([biome == FOREST, biome == TROPICAL, biome == GRASSLAND, biome == SNOW],
                    [4 + (d.uniform() * 5).astype(int), 2 + (d.uniform() * 4).astype(int),
                     (d.uniform() * 3).astype(int), (d.uniform() * 4).astype(int)], 0)
    autumn = (biome == FOREST) & d.below(0.2)
    conifer = (biome == SNOW) | ((biome == FOREST) & (np.abs(p.lat) > 50))
    veg = _VEG[biome].copy()
    veg[autumn] = (200, 110, 40)
    palm = biome == TROPICAL
    for j in range(8):
        on = _col(n_t > j)
        tx = _col(d.uniform(low=0.0, high=1.0))
        base = _col(horizon) + _col(d.uniform(low=0.02, high=0.4)) * (1 - _col(horizon))
        r = 0.03 + 0.12 * (base - _col(horizon))
        trunk_h = np.where(_col(palm), 3.0 * r, 0.8 * r)
        crown_y = base - trunk_h - r * 0.6
        trunk = (np.abs(x - tx) < 0.22 * r) & (y < base) & (y >= crown_y)
        round_crown = ((x - tx) / (0.8 * r)) ** 2 + ((y - crown_y) / r) ** 2 < 1
        cone = (y >= crown_y - 1.6 * r) & (y < base - 0.3 * r) & (
            np.abs(x - tx) < (y - (crown_y - 1.6 * r)) * 0.45)
        palm_crown = ((x - tx) / (1.5 * r)) ** 2 + ((y - crown_y) / (0.35 * r)) ** 2 < 1
        crown = np.where(_col(palm), palm_crown, np.where(_col(conifer), cone, round_crown))
        cls = np.where(palm, _C["palm"], _C["tree"]) if p.veg_kind is None else p.veg_kind
        cv.paint(on & trunk, cls, np.broadcast_to(np.float32((90, 60, 40)), (n, 3)).copy())
        leaf_col = veg + d.normal(3, scale=12.0)
        cv.paint(on & crown, cls, leaf_col)

    # The signboard: tiles coloured by the S2 cells at signature_levels, coarse to fine. It sits on
    # a grid of `tile_grid` squares per side (like street signs of one standard size), at a
    # random grid position.
    n_tiles = len(cfg.signature_levels)
    cols = cfg.tile_grid
    show = d.below(cfg.p_signboard)
    gx = np.floor(d.uniform() * max(1, cols - n_tiles + 1)) / cols
    gy = np.floor(d.uniform(low=0.15, high=0.85) * cols) / cols
    misread = d.uniform(n_tiles) < np.linspace(*cfg.p_tile_misread, n_tiles)
    tiles = np.where(misread, (d.uniform(n_tiles) * len(_TILES)).astype(int), p.tiles)
    band = _col(show) & (y >= _col(gy)) & (y < _col(gy) + 1.0 / cols)
    for m in range(n_tiles):
        x0 = _col(gx) + m / cols
        cv.paint(band & (x >= x0) & (x < x0 + 1.0 / cols), _C["signboard"], _TILES[tiles[:, m]])

    # Distractors: cars, people, rocks; sometimes a foreground occluder.
    n_o = (d.uniform() * 5).astype(int)
    for j in range(4):
        on = _col(n_o > j)
        kind = (d.uniform() * 3).astype(int)
        ox = _col(d.uniform())
        oy = _col(horizon) + _col(d.uniform(low=0.1, high=0.45)) * (1 - _col(horizon))
        s = 0.02 + 0.12 * (oy - _col(horizon))
        car = (np.abs(x - ox) < 1.6 * s) & (y < oy) & (y >= oy - s)
        person = ((x - ox) / (0.3 * s)) ** 2 + ((y - oy + 1.2 * s) / (1.2 * s)) ** 2 < 1
        rock = ((x - ox) / (1.2 * s)) ** 2 + ((y - oy) / (0.7 * s)) ** 2 < 1
        k = _col(kind)
        mask = on & np.where(k == 0, car, np.where(k == 1, person, rock))
        cls = np.array([_C["car"], _C["person"], _C["rock"]], np.uint8)[kind]
        cv.paint(mask, cls, d.uniform(3, low=20, high=235).astype(np.float32))
    occ = d.below(0.12)
    ox, oy, orad = _col(d.uniform()), _col(d.uniform(low=0.7, high=1.1)), _col(d.uniform(low=0.2, high=0.4))
    cv.paint(_col(occ) & ((x - ox) ** 2 + (y - oy) ** 2 < orad ** 2), _C["person"],
             d.uniform(3, low=10, high=90).astype(np.float32))

    # Light: gain and tint per photo, then sensor noise.
    gain = d.uniform(low=0.8, high=1.15) * np.where(dusk, 0.8, 1.0)
    tint = 1.0 + d.normal(3, scale=0.05)
    light = (gain[:, None] * tint).astype(np.float32)[:, None, None, :]
    rgb = cv.rgb * light
    for i, key in enumerate(d.keys.tolist()):  # sensor noise, one generator per photo
        rgb[i] += np.random.default_rng(key).standard_normal((S, S, 3), dtype=np.float32) * cfg.noise_sigma
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8), cv.cls


# --------------------------------------------------------------------------------------------
# Writing a split: JPEGs, class maps and a manifest.


@dataclass(frozen=True)
class WorldSplit:
    """A generated split on disk."""

    directory: Path
    manifest: Path  # CSV: path (relative to the manifest's folder), lat, lon, id
    n: int
    seed: int
    config: WorldConfig = field(default_factory=WorldConfig)


def _split_identity(n: int, seed: int, cfg: WorldConfig, prefix: str) -> dict:
    d = asdict(cfg)
    d["signature_levels"] = list(cfg.signature_levels)
    d["p_tile_misread"] = list(cfg.p_tile_misread)
    if cfg.map_cue_levels:
        d["map_cue_levels"] = list(cfg.map_cue_levels)
    else:
        del d["map_cue_levels"]  # the default world's identity as before the option existed
    return {"format": WORLD_FORMAT, "format_version": WORLD_VERSION, "n": n, "seed": seed,
            "id_prefix": prefix, "config": d}


def existing_split(directory: str | os.PathLike, n: int, seed: int, cfg: WorldConfig,
                   prefix: str = "img") -> WorldSplit | None:
    """The split at `directory` if it was fully generated with these parameters, else None."""
    directory = Path(directory)
    meta = directory / "world.json"
    manifest = directory / "manifest.csv"
    if not (meta.is_file() and manifest.is_file()):
        return None
    try:
        saved = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if {k: v for k, v in saved.items() if k != "sampler"} != _split_identity(n, seed, cfg, prefix):
        return None
    with open(manifest, newline="") as f:
        rows = sum(1 for _ in f) - 1
    if rows != n:
        return None
    return WorldSplit(directory, manifest, n, seed, cfg)


def sample_locations(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n photo locations with MP-16's density (the sampler's shipped table)."""
    from geosurge_index.sampler import sample_mp16_like

    lat, lon = sample_mp16_like(n, seed)
    return np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)


def _gps_exif(lat: float, lon: float) -> Image.Exif:
    """EXIF carrying a GPS position (degrees, minutes, seconds), as a camera writes it."""
    ex = Image.Exif()
    gps = ex.get_ifd(0x8825)

    def dms(v: float) -> tuple[float, float, float]:
        v = abs(v)
        d, m = int(v), int((v - int(v)) * 60)
        return float(d), float(m), round((v - d - m / 60) * 3600, 4)

    gps[1], gps[2] = ("N" if lat >= 0 else "S"), dms(lat)
    gps[3], gps[4] = ("E" if lon >= 0 else "W"), dms(lon)
    return ex


def write_photos(stems: list[Path], lat: np.ndarray, lon: np.ndarray, keys: np.ndarray, cfg: WorldConfig, *,
                 gps: np.ndarray | None = None, batch_size: int = 256, desc: str = "render",
                 progress: bool = True) -> None:
    """Render photos at (lat, lon) to `<stem>.jpg` + `<stem>.classmap.png`; where `gps` is True the
    JPEG carries the position in its EXIF GPS tags (a geotagged photo)."""
    n = len(stems)
    pb = bar(total=n, desc=desc, unit="img") if progress else None
    try:
        for start in range(0, n, batch_size):
            sl = slice(start, min(n, start + batch_size))
            rgb, cls = render(lat[sl], lon[sl], keys[sl], cfg)
            for i in range(sl.stop - sl.start):
                k = start + i
                stem = Path(stems[k])
                extra = {"exif": _gps_exif(float(lat[k]), float(lon[k]))} if gps is not None and gps[k] else {}
                Image.fromarray(rgb[i], "RGB").save(stem.with_suffix(".jpg"), quality=cfg.jpeg_quality,
                                                    subsampling=0, **extra)
                Image.fromarray(cls[i], "L").save(stem.with_name(stem.name + ".classmap.png"))
            if pb is not None:
                pb.update(sl.stop - sl.start)
    finally:
        if pb is not None:
            pb.close()


def generate_split(directory: str | os.PathLike, n: int, seed: int, cfg: WorldConfig | None = None,
                   *, prefix: str = "img", batch_size: int = 256, progress: bool = True) -> WorldSplit:
    """Write n photos (JPEG + `<stem>.classmap.png`) and `manifest.csv` into `directory`.

    Locations come from `sample_locations(n, seed)`, photo randomness from `seed` too: the same
    arguments give the same bytes. `world.json` is written last; `existing_split` trusts only a
    directory that has it.
    """
    cfg = cfg or WorldConfig()
    if n < 1:
        raise UserError(f"number of photos must be at least 1, got {n}")
    directory = Path(directory)
    images = directory / "images"
    images.mkdir(parents=True, exist_ok=True)
    (directory / "world.json").unlink(missing_ok=True)
    lat, lon = sample_locations(n, seed)
    keys = photo_keys(seed, np.arange(n))
    ids = [f"{prefix}-{i:06d}" for i in range(n)]
    write_photos([images / i for i in ids], lat, lon, keys, cfg, batch_size=batch_size,
                 desc=f"render {directory.name}", progress=progress)
    manifest = directory / "manifest.csv"
    tmp = manifest.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "lat", "lon", "id"])
        for i in range(n):
            w.writerow([f"images/{ids[i]}.jpg", f"{lat[i]:.7f}", f"{lon[i]:.7f}", ids[i]])
    os.replace(tmp, manifest)
    meta = _split_identity(n, seed, cfg, prefix)
    meta["sampler"] = "geosurge_index.sampler.sample_mp16_like (MP-16 density table)"
    (directory / "world.json").write_text(json.dumps(meta, indent=2) + "\n")
    return WorldSplit(directory, manifest, n, seed, cfg)


# --------------------------------------------------------------------------------------------
# A personal photo archive: trips, part of each geotagged.

ARCHIVE_FORMAT = "geosurge-demo-archive"


@dataclass(frozen=True)
class ArchiveConfig:
    """`n_trips` trips (centres with MP-16's density), `per_trip` photos each within `radius_km`
    of the trip's centre; the first `tagged` photos of each trip carry EXIF GPS, the others none."""

    n_trips: int = 30
    per_trip: int = 10
    tagged: int = 5
    radius_km: float = 3.0
    seed: int = 7

    def __post_init__(self):
        if self.n_trips < 1 or not 0 < self.tagged < self.per_trip or not self.radius_km > 0:
            raise UserError(f"archive {self}: need trips, 0 < tagged < per_trip photos, a positive radius")


def existing_archive(directory: str | os.PathLike, cfg: WorldConfig, arch: ArchiveConfig) -> Path | None:
    """The archive at `directory` if it was fully generated with these parameters."""
    meta = Path(directory) / "archive.json"
    try:
        saved = json.loads(meta.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return Path(directory) if saved == _archive_identity(cfg, arch) else None


def _archive_identity(cfg: WorldConfig, arch: ArchiveConfig) -> dict:
    return {"format": ARCHIVE_FORMAT, "format_version": 1, "world": _split_identity(0, 0, cfg, "")["config"],
            "archive": asdict(arch)}


def generate_archive(directory: str | os.PathLike, cfg: WorldConfig | None = None,
                     arch: ArchiveConfig | None = None, *, progress: bool = True) -> Path:
    """A personal archive of the demo world: `tagged/` (photos with EXIF GPS), `untagged/` (the
    rest of each trip, no GPS), `truth.csv` (id = path relative to `directory`, lat, lon, trip, of
    every photo). `archive.json` is written last."""
    cfg = cfg or WorldConfig()
    arch = arch or ArchiveConfig()
    d = Path(directory)
    (d / "archive.json").unlink(missing_ok=True)
    for sub in ("tagged", "untagged"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    clat, clon = sample_locations(arch.n_trips, arch.seed)
    rng = np.random.default_rng([arch.seed, 5])
    n = arch.n_trips * arch.per_trip
    trip = np.repeat(np.arange(arch.n_trips), arch.per_trip)
    r = arch.radius_km * np.sqrt(rng.random(n))  # uniform in the disk
    bearing = rng.random(n) * 2 * np.pi
    lat = np.clip(clat[trip] + r * np.cos(bearing) / 111.2, -89.9, 89.9)
    lon = (clon[trip] + r * np.sin(bearing) / (111.2 * np.maximum(np.cos(np.radians(lat)), 0.05)) + 180) % 360 - 180
    tagged = (np.arange(n) % arch.per_trip) < arch.tagged
    names = [f"{'tagged' if t else 'untagged'}/trip{k // arch.per_trip:03d}-{k % arch.per_trip:02d}"
             for k, t in enumerate(tagged)]
    write_photos([d / nm for nm in names], lat, lon, photo_keys(arch.seed + 99, np.arange(n)), cfg, gps=tagged,
                 desc="render archive", progress=progress)
    tmp = d / "truth.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "lat", "lon", "trip", "tagged"])
        for k in range(n):
            w.writerow([f"{names[k]}.jpg", f"{lat[k]:.7f}", f"{lon[k]:.7f}", int(trip[k]), int(tagged[k])])
    os.replace(tmp, d / "truth.csv")
    (d / "archive.json").write_text(json.dumps(_archive_identity(cfg, arch), indent=2) + "\n")
    return d
