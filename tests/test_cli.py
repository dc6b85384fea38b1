"""The `geosurge` command line as a whole: every subcommand module loads, loudly."""

from __future__ import annotations

import pytest

import geosurge_index.cli as cli


def test_every_subcommand_and_benchmark_is_registered():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) >= {"partition", "model-info", "segment", "train", "export", "search", "locate",
                                "sql", "eval", "coverage", "map", "serve", "demo", "bench"}
    bench = next(a for a in sub.choices["bench"]._actions if a.dest == "bench")
    assert set(bench.choices) >= {"partition", "search", "locate", "train", "demo-world"}


def test_a_subcommand_that_fails_to_import_fails_loudly(monkeypatch):
    # (it used to vanish from `geosurge --help` without a word)
    monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "no_such_stage"])
    with pytest.raises(ModuleNotFoundError, match="no_such_stage"):
        cli.build_parser()


def test_bench_settings_come_from_the_flags():
    from geosurge_index.bench.search import SearchBench

    args = cli.build_parser().parse_args(["bench", "search", "--quick", "--beams", "1,4", "--device", "cpu"])
    got = cli.settings_from_args(SearchBench, args)
    assert got == SearchBench(quick=True, beams="1,4", device="cpu")


def test_demo_world_bench_runs(capsys):
    assert cli.main(["bench", "demo-world", "--n", "8", "--size", "32"]) == 0
    out = capsys.readouterr().out
    assert "machine:" in out and "photos/min" in out


def test_random_index_old_home_warns():
    from geosurge_index import synthetic

    with pytest.warns(DeprecationWarning, match="synthetic.random_index"):
        from geosurge_index.cli.locate import random_index
    assert random_index is synthetic.random_index
