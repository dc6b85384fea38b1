"""One settings vocabulary (issue 11): `InferenceSettings` declared once, shared by `geosurge
locate` (flags, GEOSURGE_* variables), `LocateJob`, `Locator.open` and the service."""

from __future__ import annotations

import argparse

import pytest

from geosurge_index.cli import build_parser
from geosurge_index.errors import UserError
from geosurge_index.locate.job import LocateJob
from geosurge_index.settings import BulkSettings, InferenceSettings, ServiceSettings


def locate_args(*flags: str) -> argparse.Namespace:
    return build_parser().parse_args(["locate", "idx", "photos", "--out", "preds", *flags])


def test_locate_flags_over_environment_over_defaults(monkeypatch):
    from geosurge_index.cli.locate import job_from_args

    for name in BulkSettings.model_fields:
        monkeypatch.delenv(BulkSettings.env_name(name), raising=False)
    job = job_from_args(locate_args())
    assert (job.top_k, job.beam, job.device, job.batch_size, job.ten_crop, job.workers) == (5, None, "auto", None,
                                                                                            False, None)
    monkeypatch.setenv("GEOSURGE_TOP_K", "7")
    monkeypatch.setenv("GEOSURGE_TEN_CROP", "true")
    monkeypatch.setenv("GEOSURGE_DEVICE", "cpu")
    job = job_from_args(locate_args("--top-k", "3", "--beam", "8"))
    assert (job.top_k, job.beam, job.device, job.ten_crop) == (3, 8, "cpu", True)
    assert job_from_args(locate_args("--beam", "4,4,4,2,2,2")).beam == "4,4,4,2,2,2"
    monkeypatch.setenv("GEOSURGE_WORKERS", "-1")
    with pytest.raises(UserError, match="GEOSURGE_WORKERS: setting workers must be at least 0"):
        job_from_args(locate_args())
    monkeypatch.delenv("GEOSURGE_WORKERS")
    with pytest.raises(UserError, match=r"--top-k: 'x' is not a valid int for setting top_k"):
        job_from_args(locate_args("--top-k", "x"))


def test_locate_keeps_its_flags(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["locate", "--help"])
    out = capsys.readouterr().out
    for flag in ("--top-k N", "--beam BEAM", "--device DEVICE", "--batch-size N", "--draft-size N",
                 "--max-pixels N", "--workers N", "--chunk-size", "--save-embeddings", "GEOSURGE_TOP_K"):
        assert flag in out, flag
    assert "--ten-crop " in out and "--ten-crop BOOL" not in out  # a bare switch, as before
    assert locate_args("--ten-crop").ten_crop is True and locate_args().ten_crop is None  # None: not given


def test_locate_job_keywords_and_settings():
    job = LocateJob(index_dir="i", inputs=["p"], out_dir="o", top_k=3, beam="8", device="cpu")
    assert (job.top_k, job.beam, job.max_pixels) == (3, 8, InferenceSettings().max_pixels)
    assert job.inference_settings() == BulkSettings(top_k=3, beam=8, device="cpu")
    with pytest.raises(UserError, match="setting top_k must be at least 1, got 0"):
        LocateJob(index_dir="i", inputs=["p"], out_dir="o", top_k=0)
    from_settings = LocateJob.from_settings("i", ["p"], "o", BulkSettings(top_k=3, beam=8, device="cpu"),
                                            chunk_size=7)
    assert from_settings == LocateJob(index_dir="i", inputs=["p"], out_dir="o", top_k=3, beam=8, device="cpu",
                                      chunk_size=7)


def test_one_declaration_many_names():
    """The service calls two shared fields by its own names, in flags, variables, keywords and JSON."""
    s = ServiceSettings(max_batch_size=4, default_top_k=3)
    assert (s.batch_size, s.max_batch_size, s.top_k, s.default_top_k) == (4, 4, 3, 3)
    assert s.with_(max_batch_size=6).max_batch_size == 6
    assert {"max_batch_size", "default_top_k"} <= set(s.public_dict()) and "batch_size" not in s.public_dict()
    env = ServiceSettings.from_env({"GEOSURGE_BATCH_SIZE": "99", "GEOSURGE_MAX_BATCH_SIZE": "5",
                                    "GEOSURGE_TOP_K": "9", "geosurge_beam": "6"})
    assert (env.max_batch_size, env.default_top_k, env.beam) == (5, 5, 6)  # bulk's names are not the service's
    assert BulkSettings.from_env({"GEOSURGE_BATCH_SIZE": "99"}).batch_size == 99
    with pytest.raises(UserError, match="GEOSURGE_DEFAULT_TOP_K"):
        ServiceSettings.from_env({"GEOSURGE_DEFAULT_TOP_K": "lots"})
    # a round trip through the environment (how `ServeProcess` hands settings to a subprocess)
    s = ServiceSettings(max_batch_size=3, ten_crop=True, api_key="k", beam="4,4,4,2,2,2")
    assert ServiceSettings.from_env(s.to_env()) == s


def test_the_constructor_reads_no_environment(monkeypatch):
    """Library calls (`Locator.open`, `LocateJob`) must not change with the caller's shell."""
    monkeypatch.setenv("GEOSURGE_TOP_K", "9")
    monkeypatch.setenv("GEOSURGE_PORT", "9")
    assert InferenceSettings().top_k == 5 and ServiceSettings().port == 8000
    assert InferenceSettings.from_env().top_k == 9


def test_service_bools_take_a_value():
    p = argparse.ArgumentParser()
    ServiceSettings.add_arguments(p)
    args = p.parse_args(["--ten-crop", "false", "--max-batch-size", "3"])
    s = ServiceSettings.from_args(args, environ={"GEOSURGE_TEN_CROP": "true"})
    assert s.ten_crop is False and s.max_batch_size == 3
    with pytest.raises(UserError, match="--ten-crop: 'maybe' is not a valid bool for setting ten_crop"):
        ServiceSettings.from_args(p.parse_args(["--ten-crop", "maybe"]), environ={})
    with pytest.raises(UserError, match="unknown setting 'bogus'"):
        ServiceSettings(bogus=1)
