"""Ray is an optional extra: everything imports without it, `--ray` then says how to install it,
and the old module name `geosurge_index.distributed` still works for one release, with a warning.
These tests run with or without Ray installed (they hide it)."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from geosurge_index.errors import UserError

HINT = "pip install 'geosurge-index[ray]'"


@pytest.fixture
def no_ray(monkeypatch):
    """`import ray` fails, as in an install without the extra."""
    for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "ray", None)


def test_run_job_on_ray_without_ray_says_how_to_install_it(no_ray, tmp_path):
    from geosurge_index.locate.job import LocateJob
    from geosurge_index.locate.runner import run_job

    (tmp_path / "imgs").mkdir()
    job = LocateJob(index_dir=str(tmp_path / "index"), inputs=[str(tmp_path / "imgs")],
                    out_dir=str(tmp_path / "out"), device="cpu")
    with pytest.raises(UserError, match=r"pip install 'geosurge-index\[ray\]'"):
        run_job(job, ray_address="local")
    assert not (tmp_path / "out").exists()  # refused before the ledger was written


def test_ray_runner_entry_without_ray(no_ray):
    from geosurge_index.locate import ray_runner

    for call in (ray_runner.require_ray, lambda: ray_runner.init_ray("local")):
        with pytest.raises(UserError) as err:
            call()
        assert HINT in str(err.value)


def test_locate_cli_ray_without_ray(no_ray, tmp_path, capsys):
    from geosurge_index.cli import main

    (tmp_path / "imgs").mkdir()
    code = main(["locate", str(tmp_path / "index"), str(tmp_path / "imgs"), "--out", str(tmp_path / "out"),
                 "--ray", "local", "--device", "cpu"])
    assert code == 2
    assert HINT in capsys.readouterr().err


def test_nothing_but_the_ray_runner_needs_ray():
    # every module of the package imports in a fresh interpreter where `import ray` fails
    code = (
        "import importlib, pkgutil, sys, warnings\n"
        "sys.modules['ray'] = None\n"
        "warnings.simplefilter('ignore', DeprecationWarning)\n"
        "import geosurge_index\n"
        "for m in pkgutil.walk_packages(geosurge_index.__path__, 'geosurge_index.'):\n"
        "    importlib.import_module(m.name)\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] == 'ray' and sys.modules[k] is not None))\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(root)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_distributed_is_a_deprecated_alias_of_ray_runner(monkeypatch):
    from geosurge_index.locate import ray_runner

    monkeypatch.delitem(sys.modules, "geosurge_index.distributed", raising=False)
    with pytest.warns(DeprecationWarning, match="geosurge_index.locate.ray_runner"):
        old = importlib.import_module("geosurge_index.distributed")
    assert old.run_ray is ray_runner.run_ray and old.init_ray is ray_runner.init_ray
