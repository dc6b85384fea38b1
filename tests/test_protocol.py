"""The benchmark protocol setting: `protocol = paper` is the paper's ten-crop test protocol."""

from __future__ import annotations

import pytest

from geosurge_index.cli import build_parser
from geosurge_index.errors import UserError
from geosurge_index.locate.job import LocateJob
from geosurge_index.settings import BulkSettings, InferenceSettings, ServiceSettings


def test_protocol_paper_sets_ten_crop_everywhere():
    assert InferenceSettings().ten_crop is False and InferenceSettings().protocol is None
    assert InferenceSettings(protocol="paper").ten_crop is True
    assert InferenceSettings(protocol="fast").ten_crop is False
    assert BulkSettings.from_env({"GEOSURGE_PROTOCOL": "paper"}).ten_crop is True
    assert ServiceSettings.from_env({"GEOSURGE_PROTOCOL": "PAPER"}).ten_crop is True
    job = LocateJob("index", ["photos"], "out", protocol="paper")
    assert job.ten_crop is True and job.output_settings()["ten_crop"] is True  # recorded as ten-crop
    args = build_parser().parse_args(["locate", "index", "photos", "--out", "preds", "--protocol", "paper"])
    assert BulkSettings.from_args(args, {}).ten_crop is True
    s = InferenceSettings(protocol="paper")
    assert s.with_(top_k=3).ten_crop is True  # a copy keeps it


def test_protocol_mistakes_are_refused_by_name():
    with pytest.raises(UserError, match="protocol"):
        InferenceSettings(protocol="ten")
    with pytest.raises(UserError, match="centre crop"):
        InferenceSettings(protocol="fast", ten_crop=True)


def test_eval_and_locate_help_name_the_protocol(capsys):
    for argv in (["eval", "--help"], ["locate", "--help"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(argv)
        out = capsys.readouterr().out
        assert "--protocol" in out or "protocol paper" in out
        assert "ten-crop" in out
