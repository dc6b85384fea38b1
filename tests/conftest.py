import os

# Progress bars are noise in test logs.
os.environ.setdefault("GEOSURGE_NO_PROGRESS", "1")
