"""The GeoSURGE model: CLIP backbone, segmenter, semantic fusion, geographic embeddings, loss.

Cross-stage API (ARCHITECTURE.md): `ModelConfig`, `GeoSurgeModel`, `VisualEncoder`,
`load_checkpoint`, `read_geo_tables`, `save_encoder`, `load_encoder`. Importing this package
imports torch; transformers is imported only when a model is built.
"""

from geosurge_index.model.checkpoint import (
    Checkpoint,
    load_checkpoint,
    read_checkpoint_meta,
    read_geo_tables,
    save_checkpoint,
)
from geosurge_index.model.config import (
    BackboneConfig,
    FusionConfig,
    ModelConfig,
    SegmenterConfig,
    full_config,
    tiny_config,
)
from geosurge_index.model.encoder import VisualEncoder
from geosurge_index.model.encoder_io import (
    encoder_image_size,
    load_encoder,
    read_encoder_config,
    save_encoder,
)
from geosurge_index.model.geo import GeoEmbeddings
from geosurge_index.model.geosurge import GeoSurgeModel, count_parameters, parameter_report
from geosurge_index.model.inference import embed_ten_crop, ten_crop_class_maps
from geosurge_index.model.loss import hierarchical_info_nce
from geosurge_index.model.small_segmenter import SmallSegmenter  # registers segmenter kind "small"

__all__ = [
    "BackboneConfig",
    "Checkpoint",
    "FusionConfig",
    "GeoEmbeddings",
    "GeoSurgeModel",
    "ModelConfig",
    "SegmenterConfig",
    "SmallSegmenter",
    "VisualEncoder",
    "count_parameters",
    "embed_ten_crop",
    "encoder_image_size",
    "full_config",
    "hierarchical_info_nce",
    "load_checkpoint",
    "load_encoder",
    "parameter_report",
    "read_checkpoint_meta",
    "read_encoder_config",
    "read_geo_tables",
    "save_checkpoint",
    "save_encoder",
    "ten_crop_class_maps",
    "tiny_config",
]
