"""geosurge-index: GeoSURGE image geo-localization backend."""

__version__ = "0.1.0"
