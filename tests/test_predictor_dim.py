"""`Predictor.embed_dim` comes from the encoder's config or the index, never a guessed constant;
an encoder and an index of different widths are refused when the predictor is built."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geosurge_index.errors import FormatError
from geosurge_index.index import GeoIndex
from geosurge_index.locate.decode import DecodedBatch
from geosurge_index.locate.predictor import Predictor, SearchSettings, embedding_dim
from geosurge_index.synthetic import synthetic_hierarchy


class FakeEncoder(torch.nn.Module):
    image_size = 8

    def __init__(self, dim: int | None = None, config_dim: int | None = None):
        super().__init__()
        if dim is not None:
            self.embed_dim = dim
        if config_dim is not None:
            self.config = type("Config", (), {"embed_dim": config_dim})()


@pytest.fixture(scope="module")
def index():
    h = synthetic_hierarchy(200, dim=12, seed=0)
    return GeoIndex.from_arrays(h.tables, h.temperatures, h.tree())


def test_dim_from_encoder_or_config_or_index(index):
    cpu = torch.device("cpu")
    assert Predictor(FakeEncoder(12), index, cpu).embed_dim == 12
    assert Predictor(FakeEncoder(config_dim=12), index, cpu).embed_dim == 12
    assert Predictor(FakeEncoder(), index, cpu).embed_dim == 12  # the index's tables
    assert Predictor(FakeEncoder(24), None, cpu).embed_dim == 24  # encoder only (benchmarks)
    assert embedding_dim(FakeEncoder(), None) is None
    with pytest.raises(ValueError, match="unknown"):
        _ = Predictor(FakeEncoder(), None, cpu).embed_dim


def test_encoder_and_index_of_different_widths_are_refused(index):
    for enc in (FakeEncoder(768), FakeEncoder(config_dim=16)):
        with pytest.raises(FormatError, match=r"-d embeddings but the index's cell tables are 12-d"):
            Predictor(enc, index, torch.device("cpu"))


def test_save_embeddings_on_an_all_failed_batch_needs_no_encoder_width(index):
    pred = Predictor(FakeEncoder(), index, torch.device("cpu"), SearchSettings(save_embeddings=True))
    n = 2
    batch = DecodedBatch(rows=np.arange(n), ok=np.zeros(n, bool), pixels=np.zeros((0, 8, 8, 3), np.uint8),
                         class_maps=np.zeros((0, 8, 8), np.uint8), has_map=np.zeros(0, bool),
                         width=np.zeros(n, np.int32), height=np.zeros(n, np.int32),
                         errors=["zero_bytes: empty", "zero_bytes: empty"])
    table = pred.predict(batch, ["a", "b"], ["a", "b"])
    assert table.num_rows == n and table.column("embedding").null_count == n
