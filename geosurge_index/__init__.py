"""geosurge-index: GeoSURGE image geo-localization backend.

`from geosurge_index import Locator` is the Python API (`geosurge_index.locate.Locator`),
imported on first use so that `import geosurge_index` stays light (no torch)."""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

__all__ = ["Locator", "Prediction", "__version__"]

if TYPE_CHECKING:
    from geosurge_index.locate.locator import Locator, Prediction


def __getattr__(name: str):
    if name in ("Locator", "Prediction"):
        from geosurge_index.locate import locator

        return getattr(locator, name)
    raise AttributeError(f"module 'geosurge_index' has no attribute {name!r}")
