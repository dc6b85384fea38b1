"""One progress bar for all long work (tqdm on stderr; quiet when GEOSURGE_NO_PROGRESS is set)."""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def bar(iterable=None, *, total=None, desc: str = "", unit: str = "it", **kwargs) -> tqdm:
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=True,
        dynamic_ncols=True,
        mininterval=0.5,
        disable=bool(os.environ.get("GEOSURGE_NO_PROGRESS")),
        **kwargs,
    )
