"""Deprecated name of `geosurge_index.locate.ray_runner` (kept for one release)."""

import warnings

from geosurge_index.locate.ray_runner import *  # noqa: F403
from geosurge_index.locate.ray_runner import init_ray, run_ray  # noqa: F401

warnings.warn("geosurge_index.distributed is now geosurge_index.locate.ray_runner; the old name goes "
              "in the next release", DeprecationWarning, stacklevel=2)
