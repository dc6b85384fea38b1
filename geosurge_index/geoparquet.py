"""GeoParquet for prediction shards: a WKB point column and the `geo` file metadata.

GeoParquet 1.1 (https://geoparquet.org/releases/v1.1.0/): the geometry is a binary column of
ISO WKB, and the Parquet key-value metadata `geo` names it, its encoding and geometry types.
No `crs` key means OGC:CRS84 (longitude, latitude on WGS 84), which is what the points are.
With both, geopandas (`read_parquet`), GDAL/OGR and QGIS open a shard, or the whole PRED_DIR,
as a point layer.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

GEOMETRY_COLUMN = "geometry"
GEO_KEY = b"geo"
GEO_METADATA = json.dumps({
    "version": "1.1.0",
    "primary_column": GEOMETRY_COLUMN,
    "columns": {GEOMETRY_COLUMN: {"encoding": "WKB", "geometry_types": ["Point"]}},
}).encode()

# WKB Point, little-endian: byte order 1, geometry type 1, x, y
_WKB_POINT = np.dtype([("order", "u1"), ("type", "<u4"), ("x", "<f8"), ("y", "<f8")])
assert _WKB_POINT.itemsize == 21


def points_wkb(lon, lat) -> pa.Array:
    """WKB points (binary, one per row; null where lon or lat is null or not finite)."""
    lon = np.asarray(lon, dtype=np.float64)
    lat = np.asarray(lat, dtype=np.float64)
    valid = np.isfinite(lon) & np.isfinite(lat)
    recs = np.zeros(int(valid.sum()), dtype=_WKB_POINT)
    recs["order"], recs["type"], recs["x"], recs["y"] = 1, 1, lon[valid], lat[valid]
    offsets = np.zeros(len(lon) + 1, dtype=np.int32)
    np.cumsum(np.where(valid, _WKB_POINT.itemsize, 0), out=offsets[1:])
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little").tobytes())
    return pa.Array.from_buffers(pa.binary(), len(lon), [bitmap, pa.py_buffer(offsets.tobytes()),
                                                         pa.py_buffer(recs.tobytes())],
                                 null_count=int((~valid).sum()))


def with_geo_metadata(obj: pa.Schema | pa.Table) -> pa.Schema | pa.Table:
    """The schema or table with the GeoParquet `geo` metadata, when it has the geometry column."""
    schema = obj.schema if isinstance(obj, pa.Table) else obj
    if GEOMETRY_COLUMN not in schema.names:
        return obj
    meta = {**(schema.metadata or {}), GEO_KEY: GEO_METADATA}
    return obj.replace_schema_metadata(meta) if isinstance(obj, pa.Table) else obj.with_metadata(meta)
