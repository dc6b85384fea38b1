"""The CUDA branches, exercised on the CPU by substitution (issue 19): fake device counts, fake
free memory, fake bf16 support, a recording `torch.cuda.device`, CPU autocast."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from geosurge_index import devices
from geosurge_index.errors import UserError
from geosurge_index.model import VisualEncoder, tiny_config
from geosurge_index.model.segmenter import MEMORY_ENV, upsample_argmax


@pytest.fixture(scope="module")
def encoders():
    torch.manual_seed(0)
    return {kind: VisualEncoder(tiny_config(kind)).eval() for kind in ("segformer", "oneformer")}


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch 'sees' n GPUs; `torch.cuda.device(d)` records the GPU made current."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    entered: list = []

    @contextlib.contextmanager
    def device_ctx(d):
        entered.append(torch.device(d))
        yield
        entered.pop()

    def fake(n: int = 2, bf16: bool = True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "device", device_ctx)
        calls = []

        def is_bf16_supported(including_emulation=True):
            calls.append(including_emulation)
            return bf16

        monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
        return calls

    fake.entered = entered
    return fake


# -- 1. segmenter memory -----------------------------------------------------------------------


def _reference(seg, x):
    """Today's path: one call, the whole (B, C, S, S) fp32 upsample, then argmax."""
    y = x * seg.scale + seg.shift
    y = F.interpolate(y, size=(seg.input_size,) * 2, mode="bilinear", align_corners=False)
    scores = F.interpolate(seg.class_scores(y).float(), size=x.shape[-2:], mode="bilinear", align_corners=False)
    return scores.argmax(1)


@pytest.mark.parametrize("kind", ["segformer", "oneformer"])
def test_sub_batched_segmentation_equals_one_call(encoders, kind, monkeypatch):
    seg = encoders[kind].segmenter
    torch.manual_seed(1)
    x = torch.randn(5, 3, 48, 48)  # not the segmenter's input size: resized as before
    with torch.no_grad():
        want = _reference(seg, x)
    monkeypatch.setenv(MEMORY_ENV, "100000")
    assert seg.sub_batch(5, 48, "cpu") == 5
    whole = seg(x)
    # a budget of two images' working memory: calls of 2, 2, 1
    monkeypatch.setenv(MEMORY_ENV, str(2.5 * seg.bytes_per_image(48) / 2**20))
    assert seg.sub_batch(5, 48, "cpu") == 2
    calls = []
    real = seg.class_scores
    monkeypatch.setattr(seg, "class_scores", lambda y: calls.append(len(y)) or real(y))
    parts = seg(x)
    assert calls == [2, 2, 1]
    assert torch.equal(parts, whole) and torch.equal(whole, want)
    assert parts.dtype == torch.int64 and parts.shape == (5, 48, 48)


def test_bad_memory_setting_is_a_user_error(encoders, monkeypatch):
    monkeypatch.setenv(MEMORY_ENV, "lots")
    with pytest.raises(UserError, match=MEMORY_ENV):
        encoders["segformer"].segmenter(torch.randn(2, 3, 64, 64))


def test_chunked_upsample_argmax_is_exact_including_ties():
    torch.manual_seed(2)
    scores = torch.randn(3, 150, 9, 9)
    scores[:, 7] = scores[:, 3]  # exact ties between classes in different chunks: the lower wins
    scores[:, 140] = scores[:, 3]
    scores[0, :, :4] = 0.25  # a tie across every class
    want = F.interpolate(scores, size=(37, 41), mode="bilinear", align_corners=False).argmax(1)
    plane = 37 * 41 * 4
    # 1 image x 64 classes, 2 images x 64, 1 x 128, 3 x 150 (all at once)
    for chunk in (1, 2 * 64 * plane, 130 * plane, 10**12):
        assert torch.equal(upsample_argmax(scores, (37, 41), chunk_bytes=chunk), want), chunk
    big = torch.randn(2, 150, 32, 32)  # a bulk-locate-like map: 128 -> 336 would be slow here
    want = F.interpolate(big, size=(84, 84), mode="bilinear", align_corners=False).argmax(1)
    assert torch.equal(upsample_argmax(big, (84, 84), chunk_bytes=1), want)
    assert torch.equal(upsample_argmax(scores.bfloat16(), (37, 41), 1),
                       F.interpolate(scores.bfloat16().float(), size=(37, 41), mode="bilinear").argmax(1))


def test_oneformer_class_scores_are_fp32_under_autocast(encoders):
    seg = encoders["oneformer"].segmenter
    x = torch.randn(2, 3, seg.input_size, seg.input_size)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = seg.model(pixel_values=x, task_inputs=seg.task_inputs.expand(2, -1))
        scores = seg.class_scores(x)
    assert scores.dtype == torch.float32
    classes = out.class_queries_logits.float().softmax(-1)[..., :-1]
    want = torch.einsum("bqc,bqhw->bchw", classes, out.masks_queries_logits.float().sigmoid())
    assert torch.equal(scores, want)  # the fp32 einsum of the same outputs, not a bf16 one


def test_cuda_budget_comes_from_free_memory(encoders, monkeypatch):
    seg = encoders["oneformer"].segmenter
    monkeypatch.delenv(MEMORY_ENV, raising=False)
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (20 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 6 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: 2 * gib)
    cuda = torch.device("cuda", 0)
    assert devices.free_memory(cuda) == 24 * gib  # free + torch's unused cache
    assert seg.memory_budget(cuda) == 12 * gib
    # the full model's OneFormer at 512 px, a bulk-locate batch of 256 at 336 px: ~30 images a call
    monkeypatch.setattr(seg, "input_size", 512)
    n = seg.sub_batch(256, 336, cuda)
    assert n == 12 * gib // seg.bytes_per_image(336) and 20 <= n <= 40
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (0, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: 0)
    assert seg.sub_batch(256, 336, cuda) == 1  # never 0


# -- 3. the autocast dtype -------------------------------------------------------------------------


def test_autocast_dtype_bf16_only_where_native(fake_cuda):
    calls = fake_cuda(2, bf16=True)
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 1)
    assert devices.autocast_dtype(cpu) is None and devices.autocast_dtype(cpu, "fp32") is None
    assert devices.autocast_dtype(cpu, "bf16") == torch.bfloat16  # asked for: allowed (slow) on the CPU
    assert devices.autocast_dtype(gpu) == torch.bfloat16
    assert calls == [False]  # emulated bf16 does not count
    assert fake_cuda.entered == []  # the context was left
    fake_cuda(2, bf16=False)  # a V100 / T4
    assert devices.autocast_dtype(gpu) == torch.float16
    assert devices.autocast_dtype(gpu, "fp16") == torch.float16
    assert devices.autocast_dtype(gpu, "fp32") is None
    with pytest.raises(UserError, match="no native bf16"):
        devices.autocast_dtype(gpu, "bf16")
    with pytest.raises(UserError, match="precision 'half'"):
        devices.autocast_dtype(gpu, "half")
    assert [devices.dtype_name(d) for d in (None, torch.bfloat16, torch.float16)] == ["fp32", "bf16", "fp16"]


def test_predictor_encodes_under_the_chosen_autocast(encoders):
    from geosurge_index.locate.predictor import Predictor

    enc = encoders["segformer"]
    rng = np.random.default_rng(0)
    s = enc.image_size
    px = rng.integers(0, 256, (3, s, s, 3), dtype=np.uint8)
    maps = rng.integers(0, 150, (3, s, s), dtype=np.uint8)
    fp32 = Predictor(enc, None, "cpu")
    bf16 = Predictor(enc, None, "cpu", precision="bf16")
    assert fp32.amp_dtype is None and bf16.amp_dtype == torch.bfloat16
    a = fp32.encode(px, maps, np.ones(3, bool))
    b = bf16.encode(px, maps, np.ones(3, bool))
    assert a.dtype == b.dtype == np.float32
    assert not np.array_equal(a, b) and np.abs(a - b).max() < 0.1  # bf16 ran, close to fp32


# -- 2. device strings: torchrun, Ray -------------------------------------------------------------


def test_torchrun_sets_the_device_before_the_process_group(fake_cuda, monkeypatch):
    import torch.distributed as tdist

    from geosurge_index import train

    fake_cuda(2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    events = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: events.append(("set_device", torch.device(d))))
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(tdist, "init_process_group", lambda **kw: events.append(("init", kw)))
    monkeypatch.setattr(tdist, "get_rank", lambda: 1)
    monkeypatch.setattr(tdist, "get_world_size", lambda: 2)
    dist, device = train.setup_process("cuda")
    assert device == torch.device("cuda", 1) and (dist.rank, dist.world, dist.local_rank) == (1, 2, 1)
    assert events == [("set_device", torch.device("cuda", 1)),
                      ("init", {"backend": "nccl", "device_id": torch.device("cuda", 1)})]
    events.clear()
    with pytest.raises(UserError, match="under torchrun"):
        train.setup_process("cuda:0")  # every rank on GPU 0: refused before any process group
    assert events == []
    dist, device = train.setup_process("cpu")
    assert device == torch.device("cpu") and events == [("init", {"backend": "gloo"})]


def test_ray_actor_device_is_decided_in_the_driver():
    from geosurge_index.locate.ray_runner import ActorPlan, plan_actors

    assert plan_actors("cpu", 4) == ActorPlan("cpu", 1, 0.0)
    assert plan_actors("auto", 0) == ActorPlan("cpu", 1, 0.0)
    assert plan_actors("auto", 4) == ActorPlan("cuda", 4, 1.0)
    assert plan_actors("cuda:3", 4) == ActorPlan("cuda", 4, 1.0)  # each actor sees its GPU as cuda:0
    assert plan_actors("cuda", 2, gpus_per_actor=0.5) == ActorPlan("cuda", 4, 0.5)
    assert plan_actors("cuda", 2, actors=1) == ActorPlan("cuda", 1, 1.0)
    assert plan_actors("cpu", 0, actors=3, gpus_per_actor=1).use_gpu is False
    with pytest.raises(UserError, match="no GPUs"):
        plan_actors("cuda", 0)
    with pytest.raises(UserError, match="no GPUs"):
        plan_actors("cuda:1", 0)
    with pytest.raises(UserError, match="--ray-gpus-per-actor 0: must be more than 0"):
        plan_actors("auto", 4, gpus_per_actor=0)
    with pytest.raises(UserError, match="has 2 GPU"):
        plan_actors("cuda", 2, gpus_per_actor=3)
    with pytest.raises(UserError, match="not a device"):
        plan_actors("cudax", 2)
    with pytest.raises(UserError, match="--ray-actors 0"):
        plan_actors("cpu", 0, actors=0)


def test_ray_flags_are_checked_before_the_ledger(tmp_path):
    pytest.importorskip("ray")
    from geosurge_index import locate

    job = locate.LocateJob(index_dir=str(tmp_path), inputs=[str(tmp_path)], out_dir=str(tmp_path / "out"))
    with pytest.raises(UserError, match="gpus-per-actor 0"):
        locate.run_job(job, ray_address="local", ray_options={"gpus_per_actor": 0})
    assert not (tmp_path / "out").exists()


# -- 4. host memory ---------------------------------------------------------------------------------


def test_workers_follow_the_cpu_affinity(monkeypatch):
    from geosurge_index.locate import job

    monkeypatch.setattr(job.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(job.os, "cpu_count", lambda: 64)
    assert job.available_cores() == 3
    assert job.default_workers(True) == 2 and job.default_workers(False) == 1


def test_loader_fits_free_shared_memory():
    from geosurge_index.locate.job import batch_bytes, plan_loader

    mib = 2**20
    b = batch_bytes(256, 336)
    assert b == 256 * 336 * 336 * 4 and 110 * mib < b < 120 * mib
    roomy = plan_loader(True, b, cores=16, shm_free=32 * 2**30)
    assert (roomy.workers, roomy.prefetch) == (15, 4) and "reduced" not in roomy.line
    mid = plan_loader(True, b, cores=16, shm_free=2**30)  # 512 MiB usable: 4 batches in flight
    assert (mid.workers, mid.prefetch) == (4, 1) and "reduced from 15 x 4" in mid.line
    some = plan_loader(True, b, workers=2, cores=16, shm_free=2**30)
    assert (some.workers, some.prefetch) == (2, 2)
    docker = plan_loader(True, b, cores=16, shm_free=64 * mib)  # Docker's default /dev/shm
    assert (docker.workers, docker.prefetch) == (0, None)
    assert "in this process" in docker.line and "--shm-size" in docker.line and "16 core" in docker.line
    unknown = plan_loader(False, b, workers=3, cores=4, shm_free=None)
    assert (unknown.workers, unknown.prefetch) == (3, 4) and "/dev/shm unknown" in unknown.line
    assert plan_loader(True, b, workers=0, shm_free=0).workers == 0


def test_bulk_locate_pins_on_the_predictors_gpu(encoders, fake_cuda, tmp_path, capsys):
    """cuda:1: the loader runs with GPU 1 current (its pinning thread pins there), the line says
    what was chosen."""
    from _locate_fixtures import write_folder

    from geosurge_index import locate
    from geosurge_index.locate.predictor import Predictor
    from geosurge_index.synthetic import random_index

    index_dir = random_index(tmp_path / "index", n_points=800)
    real = Predictor.open(index_dir, "cpu")
    fake_cuda(2)
    seen = []

    class OnGpu1:
        device = torch.device("cuda", 1)
        settings = real.settings
        image_size = real.image_size

        def predict(self, batch, ids, paths):
            seen.append(list(fake_cuda.entered))
            return real.predict(batch, ids, paths)

    write_folder(tmp_path / "imgs", n_extra=0)
    job = locate.LocateJob(index_dir=str(index_dir), inputs=[str(tmp_path / "imgs")], out_dir=str(tmp_path / "out"),
                           batch_size=4, workers=0, device="cuda:1")
    with pytest.warns(UserWarning, match="pin_memory"):  # no accelerator in this torch build
        summary = locate.run_job(job, predictor=OnGpu1())
    assert summary["complete"] and seen and all(s == [torch.device("cuda", 1)] for s in seen)
    assert "locate: decoding: 0 worker process(es) (in this process)" in capsys.readouterr().err


# -- 5. FLOP counting and syncing -------------------------------------------------------------------


def test_flops_include_scaled_dot_product_attention(encoders):
    from torch.utils.flop_counter import FlopCounterMode

    from geosurge_index.bench.locate import count_flops

    q = torch.randn(1, 4, 16, 8)
    assert count_flops(F.scaled_dot_product_attention, q, q, q) == 2 * 2 * 4 * 16 * 16 * 8
    enc = encoders["segformer"]
    x = torch.randn(1, 3, enc.image_size, enc.image_size)
    cm = torch.zeros(1, enc.image_size, enc.image_size, dtype=torch.long)
    with torch.no_grad():
        with FlopCounterMode(display=False) as plain:
            enc(x, cm)
        counted = count_flops(enc, x, cm)
        with_seg = count_flops(enc, x)
    assert counted >= plain.get_total_flops() and with_seg > counted


def test_gpu_bench_honours_with_segmenter(encoders, monkeypatch):
    from geosurge_index.bench.locate import LocateBench, _bench_gpu

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H200")
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a: self)
    enc = encoders["segformer"]
    lines = []
    flops = {True: 10**9, False: 3 * 10**9}
    base = LocateBench(gpu_batch_size=2, gpu_images=2)
    out = _bench_gpu(enc, torch.device("cpu"), base, flops, lines.append)
    assert "with_segmenter" not in out and out["class_map_given"]["flops_per_image"] == 10**9
    assert out["bf16_peak_tflops"] == 989.4 and out["autocast"] == "fp32"
    out = _bench_gpu(enc, torch.device("cpu"), LocateBench(gpu_batch_size=2, gpu_images=2, with_segmenter=True),
                     flops, lines.append)
    seg = out["with_segmenter"]
    assert seg["flops_per_image"] == 3 * 10**9  # the CPU count, as for the other figure
    assert seg["fraction_of_bf16_peak"] == pytest.approx(3e9 * seg["images_per_s"] / 989.4e12)
    assert len(lines) == 3 and "with segmenter" in lines[-1]


def test_synchronize_names_the_device(fake_cuda, monkeypatch):
    fake_cuda(2)
    synced = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: synced.append(d))
    devices.synchronize("cuda:1")
    devices.synchronize("cpu")
    from geosurge_index.bench.search import _sync

    _sync("cuda:1")
    assert synced == [torch.device("cuda", 1)] * 2
