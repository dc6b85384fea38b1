"""devices.resolve_device: one set of rules for every --device flag (CUDA faked by monkeypatching)."""

from __future__ import annotations

import pytest
import torch

from geosurge_index.devices import resolve_device
from geosurge_index.errors import UserError


@pytest.fixture
def gpus(monkeypatch):
    """Pretend torch sees `n` GPUs; no torchrun variables."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)

    def fake(n: int):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return fake


def test_auto_cpu_and_cuda(gpus):
    gpus(0)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device("cpu") == resolve_device(" cpu ")
    with pytest.raises(UserError, match="'cuda'.*no CUDA"):
        resolve_device("cuda")
    gpus(2)
    assert resolve_device() == torch.device("cuda") == resolve_device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1) == resolve_device(torch.device("cuda:1"))
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)  # e.g. training's LOCAL_RANK


@pytest.mark.parametrize("bad, match", [("cudax", "'cudax': not a device"), ("gpu", "'gpu': not a device"),
                                        ("", "not a device"), ("meta", "'meta': expected auto, cpu")])
def test_bad_strings_name_the_value(gpus, bad, match):
    gpus(1)
    with pytest.raises(UserError, match=match):
        resolve_device(bad)


def test_cuda_ordinal_is_checked(gpus):
    gpus(2)
    with pytest.raises(UserError, match=r"'cuda:2'.*2 CUDA device\(s\), cuda:0..cuda:1"):
        resolve_device("cuda:2")
    with pytest.raises(UserError, match="cuda:3"):
        resolve_device("cuda", local_rank=3)


def test_under_torchrun_cuda_is_the_local_rank(gpus, monkeypatch):
    gpus(4)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("cuda") == torch.device("cuda", 2) == resolve_device("auto")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(UserError, match="under torchrun"):
        resolve_device("cuda:0")  # every process would take GPU 0
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(UserError, match="4 CUDA device"):
        resolve_device("cuda")


def test_old_names_resolve_the_same_way(gpus):
    from geosurge_index.locate.predictor import resolve_device as predictor_resolve
    from geosurge_index.train import resolve_device as train_resolve

    gpus(0)
    assert predictor_resolve("auto") == train_resolve("auto", 0) == torch.device("cpu")
    for fn in (predictor_resolve, lambda d: train_resolve(d, 0)):
        with pytest.raises(UserError, match="cudax"):
            fn("cudax")
