"""Importers: published geolocation models turned into an INDEX_DIR (`geosurge import ...`).

- `geoclip`: GeoCLIP (NeurIPS 2023, MIT) from its `geoclip` wheel + CLIP ViT-L/14.
"""
