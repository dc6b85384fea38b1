"""Benchmarks (`geosurge bench ...`): each measures one stage, prints the machine and its method.

The CLI modules only parse flags and call the functions here; tests and the demo import them
from here, never from `geosurge_index.cli`.
"""
