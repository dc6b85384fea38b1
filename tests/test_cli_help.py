"""Every `--help` explains with an example (issue 14, §6)."""

from __future__ import annotations

import argparse

from geosurge_index.cli import build_parser


def _parsers(parser: argparse.ArgumentParser, name: str = "geosurge"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from _parsers(p, f"{name} {sub}")


def test_every_help_has_an_example():
    found = dict(_parsers(build_parser()))
    assert len(found) > 20  # every subcommand, the benchmarks, `map cells` ...
    missing = [name for name, p in found.items() if "example" not in p.format_help().lower()]
    assert not missing, f"--help without an example: {missing}"
    for name, p in found.items():  # an example is a command line of that command
        assert name.split()[:2] == ["geosurge", *name.split()[1:2]]
        if name != "geosurge":
            assert name in p.format_help(), name


def test_no_verify_help_says_the_default():
    for name, p in _parsers(build_parser()):
        for action in p._actions:
            if "--no-verify" in action.option_strings:
                assert "default" in action.help.lower(), name
