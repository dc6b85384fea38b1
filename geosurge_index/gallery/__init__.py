"""Galleries: geotagged reference images inside INDEX_DIR, searched inside the best cells.

- `store`: the on-disk format (an IVF index whose lists are the finest cells, a sidecar table),
  loading and searching one gallery;
- `refine`: the prediction rule (nearest reference inside the best cells, else the cell's mean);
- `build`: `add_gallery` / `remove_gallery` / `list_galleries` (sources, staging, atomic commit).
"""
