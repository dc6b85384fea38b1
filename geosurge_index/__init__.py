"""geosurge-index: GeoSURGE image geo-localization backend.

`from geosurge_index import Locator` is the Python API (`geosurge_index.locate.Locator`),
imported on first use so that `import geosurge_index` stays light (no torch) and the package
root imports none of its modules (they import it: `from geosurge_index import images`)."""

import importlib

__version__ = "0.1.0"

_LAZY = {"Locator": "geosurge_index.locate.locator", "Prediction": "geosurge_index.locate.locator"}

__all__ = ["Locator", "Prediction", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'geosurge_index' has no attribute {name!r}")
