"""An index's own default search (`index.set_search_defaults`, manifest `search_defaults`): used
whenever the caller gives no beam / refine cells, overridden by an explicit one, refused when
malformed; an index without it searches with the engine's defaults."""

from __future__ import annotations

import numpy as np
import pytest

from geosurge_index.errors import UserError
from geosurge_index.index import GeoIndex, read_manifest, set_search_defaults, verify_index
from geosurge_index.search import DEFAULT_BEAM


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory):
    from geosurge_index.synthetic import random_index

    return random_index(tmp_path_factory.mktemp("sd") / "index", n_points=1500)


def _queries(dim: int, n: int = 200) -> np.ndarray:
    q = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def test_the_index_default_beam_is_used_unless_one_is_given(index_dir, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(index_dir, d)
    plain = GeoIndex.open(d, device="cpu", encoder=False)
    assert plain.search_defaults == {} and plain.refine_settings.cells == 3
    q = _queries(plain.dim)
    narrow = plain.search(q, beam=1)
    wide = plain.search(q)  # the engine's default beam
    assert not np.array_equal(narrow.topk_cells, wide.topk_cells)  # the beam matters on these queries

    set_search_defaults(d, beam=1, refine_cells=0)
    verify_index(d, checksums=True)  # the manifest rewrite keeps every checksum
    assert read_manifest(d)["search_defaults"] == {"beam": 1, "refine_cells": 0}
    index = GeoIndex.open(d, device="cpu", encoder=False)
    assert index.refine_settings.cells == 0
    np.testing.assert_array_equal(index.search(q).topk_cells, narrow.topk_cells)  # the index's default
    np.testing.assert_array_equal(index.search(q, beam=DEFAULT_BEAM).topk_cells, wide.topk_cells)  # explicit


def test_the_locator_and_bulk_settings_follow_the_index(index_dir, tmp_path):
    import shutil

    from geosurge_index.gallery.refine import RefineSettings
    from geosurge_index.locate.predictor import Predictor, SearchSettings

    d = tmp_path / "copy"
    shutil.copytree(index_dir, d)
    set_search_defaults(d, refine_cells=7)
    pred = Predictor.open(d, device="cpu", settings=SearchSettings())
    assert pred.index.refine_settings == RefineSettings(cells=7)  # none given: the index's
    pred = Predictor.open(d, device="cpu", settings=SearchSettings(refine_cells=2))
    assert pred.index.refine_settings.cells == 2  # given: that one


def test_malformed_defaults_are_refused_before_writing(index_dir, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(index_dir, d)
    before = (d / "manifest.json").read_bytes()
    with pytest.raises(UserError):
        set_search_defaults(d, beam="1,2,x")
    with pytest.raises(UserError):
        set_search_defaults(d, refine_cells=-1)
    assert (d / "manifest.json").read_bytes() == before
