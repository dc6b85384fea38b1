"""The `geosurge` command line: one subcommand per stage.

Each stage's flags live in its own module under `geosurge_index.cli`, which exposes
`register(subparsers)` and optionally `register_bench(bench_subparsers)`. They parse flags and
call the library (benchmarks: `geosurge_index.bench`), importing heavy libraries (torch, faiss,
ray) only inside their handlers, so `geosurge --help` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys

# Order here is the order in `geosurge --help`.
COMMAND_MODULES = [
    "partition",
    "model_info",
    "segment",
    "train",
    "export",
    "import_",
    "gallery",
    "calibrate",
    "verify",
    "search",
    "locate",
    "sql",
    "evaluate",
    "coverage",
    "maps",
    "review",
    "sidecars",
    "serve",
    "demo",
    "ablations",
]


def _load(name: str):
    # No fallback: a subcommand whose module fails to import is a broken install, said loudly,
    # never a subcommand that silently disappears from `geosurge --help`.
    return importlib.import_module(f"geosurge_index.cli.{name}")


def settings_from_args(cls, args: argparse.Namespace):
    """A settings dataclass (e.g. a benchmark's) from the parsed flags of the same names."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geosurge",
        description="GeoSURGE geo-localization backend: partition the Earth into a 7-level S2 "
        "hierarchy, train, export FAISS indexes, and geolocate images in bulk, in SQL or over HTTP.",
        epilog="Example: `geosurge demo` runs every stage on the built-in demo world; then "
        "`geosurge locate demo/index photos/ --out preds/`. Every COMMAND has --help with examples.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    bench = sub.add_parser(
        "bench",
        help="measure speed and memory of a stage (prints the machine and the method)",
        description="Benchmarks. Each prints the machine, the method and the figures.",
        epilog="Example: geosurge bench search --quick",
    )
    bench_sub = bench.add_subparsers(dest="bench", metavar="BENCHMARK")
    for name in COMMAND_MODULES:
        module = _load(name)
        module.register(sub)
        if hasattr(module, "register_bench"):
            module.register_bench(bench_sub)
    bench.set_defaults(func=lambda args: bench.print_help() or 2)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        code = args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except UserError as err:  # bad input: a clear message, no traceback
        print(f"geosurge {args.command}: error: {err}", file=sys.stderr)
        return 2
    return int(code or 0)


from geosurge_index.errors import UserError  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
