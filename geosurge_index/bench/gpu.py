"""`geosurge bench gpu` (`make gpu-check`): every GPU path once, on small sizes, in minutes.

The script to run first on a machine with a GPU. Each step runs on the chosen device and is
reported as PASS, FAIL (with the error's first line) or SKIP (with why); the command fails when a
step failed. On a machine without CUDA it runs the same steps on the CPU and skips what needs a
GPU, so it is tested here too (tests/test_gpu_check.py).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

DESCRIPTION = """\
Run every GPU code path once on small sizes and say what passed (under 10 minutes on one GPU):
  device          the device, its native bf16, the autocast dtype chosen, FAISS's GPUs
  search torch    the search engine in torch on the device; top-1 agrees with the CPU engine
  search faiss    the FAISS backend (on CUDA: level 1 through index_cpu_to_gpu)
  locate maps     bulk `geosurge locate` (DataLoader workers, pinned copies, autocast) with
                  precomputed class maps: the segmenter skipped
  locate segment  the same without class maps: the segmenter runs, in memory-sized sub-batches
  full model      (CUDA, or --full) the full-size encoder, random weights: images/s with class maps
                  given and with OneFormer Swin-L, and the fraction of the GPU's bf16 peak (FLOPs
                  counted on the CPU with the math attention backend)
  train           two optimizer steps of `geosurge train` on a generated world
  train fp16      (CUDA) the same in fp16 with the gradient scaler (GPUs without native bf16)
  service         `geosurge serve` answering one /v1/locate request
Models are config-built with random weights (nothing downloaded); data is generated.
"""

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


@dataclass(frozen=True)
class GpuCheck:
    device: str = "auto"
    images: int = 48  # images per bulk locate run
    cells: int = 4000  # finest cells of the synthetic search hierarchy
    queries: int = 512
    full: bool | None = None  # the full-size model step; None: on CUDA only
    full_batch: int = 32
    full_batches: int = 4
    train_images: int = 32
    segmenter: str = "oneformer"  # the small locate model's segmenter (config-built): oneformer | segformer
    peak_tflops: float | None = None  # None: looked up from the GPU's name
    time_budget_s: float = 540.0  # steps not started by then are skipped (the whole check < 10 min)
    workdir: str | None = None  # None: a temporary folder


@dataclass
class StepResult:
    name: str
    status: str
    seconds: float = 0.0
    detail: str = ""
    figures: dict = field(default_factory=dict)

    def line(self) -> str:
        return f"  {self.status:4}  {self.name:15} {self.seconds:7.1f} s  {self.detail}"


class Skip(Exception):
    """A step that does not apply here (raised with the reason)."""


def run_gpu_check(settings: GpuCheck, say: Callable[[str], None] | None = None) -> dict:
    """Run the steps, printing one line per step and a summary; returns {"steps": [...], ...}."""
    import tempfile

    say = say or (lambda s: print(s, flush=True))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="geosurge-gpu-check-") as tmp:
        ctx = _Context(settings, Path(settings.workdir or tmp), say)
        steps = [("device", ctx.device_step), ("search torch", ctx.search_torch),
                 ("search faiss", ctx.search_faiss), ("locate maps", lambda: ctx.locate(True)),
                 ("locate segment", lambda: ctx.locate(False)), ("full model", ctx.full_model),
                 ("train", lambda: ctx.train("auto")), ("train fp16", ctx.train_fp16),
                 ("service", ctx.service)]
        results = []
        for name, fn in steps:
            if time.perf_counter() - started > settings.time_budget_s:
                res = StepResult(name, SKIP, 0.0, f"time budget of {settings.time_budget_s:.0f} s spent")
            else:
                res = _run_step(name, fn)
            results.append(res)
            say(res.line())
    counts = {s: sum(r.status == s for r in results) for s in (PASS, FAIL, SKIP)}
    wall = time.perf_counter() - started
    say(f"gpu check: {counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped in {wall:.0f} s")
    return {"device": ctx.device_name, "steps": [r.__dict__ for r in results], "counts": counts,
            "wall_s": wall, "ok": counts[FAIL] == 0}


def _run_step(name: str, fn) -> StepResult:
    t = time.perf_counter()
    try:
        detail, figures = fn()
        status = PASS
    except Skip as why:
        detail, figures, status = str(why), {}, SKIP
    except Exception as err:  # noqa: BLE001 - a failed step is reported, the others still run
        lines = str(err).strip().splitlines()
        detail = f"{type(err).__name__}: {lines[0] if lines else ''}"
        figures, status = {"traceback": traceback.format_exc(limit=6)}, FAIL
    return StepResult(name, status, time.perf_counter() - t, detail, figures)


class _Context:
    """State shared by the steps: the device, the small index, the work folder."""

    def __init__(self, settings: GpuCheck, root: Path, say):
        self.s = settings
        self.root = root
        self.say = say
        self.device = None
        self.device_name = settings.device
        self.index_dir: Path | None = None

    @property
    def cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda"

    # -- steps: each returns (detail, figures), raises Skip or fails ---------------------------
    def device_step(self):
        import torch

        from geosurge_index.devices import (
            autocast_dtype,
            dtype_name,
            free_memory,
            native_bf16,
            resolve_device,
        )
        from geosurge_index.index import _faiss_gpus

        self.device = resolve_device(self.s.device)
        self.device_name = str(self.device)
        faiss_gpus = _faiss_gpus()
        amp = dtype_name(autocast_dtype(self.device))
        if not self.cuda:
            return (f"cpu (torch {torch.__version__}, CUDA {'available' if torch.cuda.is_available() else 'absent'}); "
                    f"autocast {amp}; FAISS GPUs {faiss_gpus}", {"autocast": amp, "faiss_gpus": faiss_gpus})
        name = torch.cuda.get_device_name(self.device)
        bf16 = native_bf16(self.device)
        free = free_memory(self.device) / 2**30
        figures = {"name": name, "native_bf16": bf16, "autocast": amp, "faiss_gpus": faiss_gpus, "free_gib": free}
        return (f"{self.device} {name}, native bf16 {'yes' if bf16 else 'no'}, autocast {amp}, "
                f"{free:.1f} GiB free, FAISS GPUs {faiss_gpus}", figures)

    def _hierarchy(self):
        if getattr(self, "_h", None) is None:
            from geosurge_index.synthetic import synthetic_hierarchy, synthetic_queries

            self._h = synthetic_hierarchy(self.s.cells, dim=64, seed=0)
            self._q, _ = synthetic_queries(self._h, self.s.queries, query_noise=2.0, seed=1)
        return self._h, self._q

    def _search(self, backend: str):
        import numpy as np

        from geosurge_index.devices import synchronize
        from geosurge_index.index import GeoIndex

        h, q = self._hierarchy()
        ref = GeoIndex.from_arrays(h.tables, h.temperatures, h.tree(), device="cpu", backend="torch")
        index = GeoIndex.from_arrays(h.tables, h.temperatures, h.tree(), device=str(self.device), backend=backend)
        want = ref.search(q, top_k=5)
        index.search(q[:16], top_k=5)  # warm-up
        synchronize(self.device)
        t = time.perf_counter()
        got = index.search(q, top_k=5)
        synchronize(self.device)
        rate = len(q) / (time.perf_counter() - t)
        agree = float(np.mean(got.topk_cells[:, 0] == want.topk_cells[:, 0]))
        exhaustive = index.search(q[:64], top_k=5, exhaustive=True)
        ex_agree = float(np.mean(exhaustive.topk_cells[:, 0] == ref.search(q[:64], top_k=5, exhaustive=True)
                                 .topk_cells[:, 0]))
        if agree < 0.98 or ex_agree < 0.98:
            raise AssertionError(f"top-1 agrees with the CPU engine on {agree:.1%} (beam) / {ex_agree:.1%} "
                                 "(exhaustive) of the queries only")
        return index, rate, agree

    def search_torch(self):
        _, rate, agree = self._search("torch")
        return (f"{rate:,.0f} queries/s on {self.device}; top-1 = CPU engine's on {agree:.1%}",
                {"queries_per_s": rate, "top1_agreement": agree})

    def search_faiss(self):
        from geosurge_index.index import _faiss_gpus

        if self.cuda and _faiss_gpus() == 0:
            raise Skip("FAISS has no GPU support here (faiss-cpu installed): search runs in torch on CUDA")
        index, rate, agree = self._search("faiss")
        scorer = getattr(index.engine, "level1_scorer", None)
        on_gpu = getattr(scorer, "gpu_resources", None) is not None
        if self.cuda and not on_gpu:
            raise AssertionError("level 1 did not go through FAISS on the GPU (index_cpu_to_gpu)")
        where = "level 1 via index_cpu_to_gpu" if on_gpu else "FAISS on the CPU"
        return (f"{rate:,.0f} queries/s ({where}); top-1 = CPU engine's on {agree:.1%}",
                {"queries_per_s": rate, "top1_agreement": agree, "level1_on_gpu": on_gpu})

    def _index(self) -> Path:
        if self.index_dir is None:
            from geosurge_index.model import tiny_config
            from geosurge_index.synthetic import random_index

            self.index_dir = random_index(self.root / "index", tiny_config(self.s.segmenter), n_points=1500)
        return self.index_dir

    def _images(self, with_maps: bool) -> Path:
        import numpy as np
        from PIL import Image

        from geosurge_index.images import class_map_path
        from geosurge_index.synthetic import write_synthetic_jpegs

        folder = self.root / ("imgs-maps" if with_maps else "imgs")
        if not folder.is_dir():
            paths = write_synthetic_jpegs(folder, self.s.images, 320, 240)
            if with_maps:
                rng = np.random.default_rng(0)
                for p in paths:
                    Image.fromarray(rng.integers(0, 150, (240, 320), dtype=np.uint8), "L").save(class_map_path(p))
        return folder

    def locate(self, with_maps: bool):
        from geosurge_index.locate.job import LocateJob
        from geosurge_index.locate.runner import run_job

        index_dir = self._index()
        out = self.root / ("preds-maps" if with_maps else "preds-segment")
        job = LocateJob(index_dir=str(index_dir), inputs=[str(self._images(with_maps))], out_dir=str(out),
                        chunk_size=max(16, self.s.images // 2), batch_size=16 if self.cuda else 8,
                        workers=None if self.cuda else 1, device=str(self.device))
        summary = run_job(job)
        if not summary["complete"] or summary["errors"]:
            raise AssertionError(f"locate: {summary['ok']} of {summary['images']} predicted, "
                                 f"errors {summary['errors_by_kind']}")
        rate = summary["this_run"]["images_per_s"]
        what = "class maps given" if with_maps else f"segmenter {self.s.segmenter} (small, config-built)"
        return f"{summary['images']} images, {rate:.1f} images/s, {what}", {"images_per_s": rate}

    def full_model(self):
        import numpy as np
        import torch

        from geosurge_index import model
        from geosurge_index.bench.locate import BF16_PEAK_TFLOPS, count_flops, peak_bf16_tflops
        from geosurge_index.devices import dtype_name, on_device, synchronize
        from geosurge_index.locate.predictor import Predictor

        run = self.cuda if self.s.full is None else self.s.full
        if not run:
            raise Skip("the full-size model runs on CUDA (or with --full)")
        torch.manual_seed(0)
        encoder = model.VisualEncoder(model.full_config(), weights=False).eval()
        rng = np.random.default_rng(0)
        s = encoder.image_size
        one_px = torch.from_numpy(rng.integers(0, 256, (1, s, s, 3), dtype=np.uint8))
        one_map = torch.from_numpy(rng.integers(0, 150, (1, s, s), dtype=np.uint8))
        cpu = Predictor(encoder, None, "cpu")
        flops = {with_map: count_flops(cpu.encode, one_px, one_map, np.array([with_map])) for with_map in (True, False)}
        pred = Predictor(encoder.to(self.device), None, self.device)
        b = self.s.full_batch if self.cuda else 1
        with on_device(self.device):
            px = torch.from_numpy(rng.integers(0, 256, (b, s, s, 3), dtype=np.uint8))
            maps = torch.from_numpy(rng.integers(0, 150, (b, s, s), dtype=np.uint8))
            if self.cuda:
                px, maps = px.pin_memory(), maps.pin_memory()
        peak = self.s.peak_tflops or (peak_bf16_tflops(torch.cuda.get_device_name(self.device)) if self.cuda else None)
        figures, parts = {"autocast": dtype_name(pred.amp_dtype), "bf16_peak_tflops": peak}, []
        for with_map in (True, False):
            has = np.full(b, with_map)
            pred.encode(px, maps, has)  # warm-up
            synchronize(self.device)
            n = self.s.full_batches if self.cuda else 1
            t = time.perf_counter()
            for _ in range(n):
                pred.encode(px, maps, has)
            synchronize(self.device)
            rate = n * b / (time.perf_counter() - t)
            frac = flops[with_map] * rate / (peak * 1e12) if peak else None
            key = "class_map_given" if with_map else "with_segmenter"
            figures[key] = {"images_per_s": rate, "flops_per_image": flops[with_map], "fraction_of_bf16_peak": frac}
            parts.append(f"{'maps given' if with_map else 'segmenter'} {rate:.1f} img/s"
                         + (f" ({100 * frac:.1f}% of bf16 peak)" if frac is not None else ""))
        known = "" if peak or not self.cuda else f" (GPU not in the peak table of {len(BF16_PEAK_TFLOPS)}: --peak-tflops)"
        return (f"batch {b}, {figures['autocast']}: " + ", ".join(parts)
                + f"; {flops[True] / 1e9:.0f} / {flops[False] / 1e9:.0f} GFLOP per image{known}", figures)

    def train(self, precision: str):
        import math

        from geosurge_index.model import tiny_config
        from geosurge_index.train import DataSettings, Recipe, SyntheticData, Trainer, TrainSettings

        n = self.s.train_images
        data = DataSettings(synthetic=SyntheticData(dir=str(self.root / "world"), train=n, val=max(4, n // 4),
                                                    tau_min=1, tau_max=[40, 20, 10, 6, 4, 3, 2]))
        batch = max(2, n // 4)
        ts = TrainSettings(epochs=1, batch_size=batch, effective_batch=batch, max_steps_per_epoch=2,
                           workers=2 if self.cuda else 0, device=str(self.device), precision=precision,
                           patience=10)
        logs: list[str] = []
        trainer = Trainer(Recipe(tiny_config(), data, ts, out=str(self.root / f"run-{precision}")),
                          self.root / f"run-{precision}", progress=False, log=logs.append)
        result = trainer.run()
        steps = trainer.state["global_step"]
        m = result.metrics[-1]
        if steps != 2 or not math.isfinite(m["train_loss"]) or not math.isfinite(m["val_loss"]):
            raise AssertionError(f"{steps} optimizer steps, train loss {m['train_loss']}, val loss {m['val_loss']}")
        from geosurge_index.devices import dtype_name

        return (f"2 steps of batch {batch}, {dtype_name(trainer.amp_dtype)}, loss {m['train_loss']:.3f}, "
                f"{m['samples_per_s']} samples/s", {"samples_per_s": m["samples_per_s"]})

    def train_fp16(self):
        if not self.cuda:
            raise Skip("fp16 with the gradient scaler is the CUDA fallback for GPUs without native bf16")
        return self.train("fp16")

    def service(self):
        import base64
        import json
        import urllib.request

        from geosurge_index.locate import Locator
        from geosurge_index.service.app import create_app
        from geosurge_index.service.runner import ServerThread
        from geosurge_index.settings import ServiceSettings
        from geosurge_index.synthetic import synthetic_jpegs

        index_dir = self._index()
        settings = ServiceSettings(index_dir=index_dir, device=str(self.device), max_wait_ms=1)
        app = create_app(settings, Locator.open(index_dir, device=str(self.device)))
        body = json.dumps({"images": [base64.b64encode(synthetic_jpegs(1, (320, 240))[0]).decode()]}).encode()
        with ServerThread(app) as srv:
            req = urllib.request.Request(srv.url + "/v1/locate", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            t = time.perf_counter()
            with urllib.request.urlopen(req, timeout=120) as r:
                status, answer = r.status, json.loads(r.read())
            ms = 1000 * (time.perf_counter() - t)
        preds = answer.get("predictions") or answer.get("results") or []
        if status != 200 or not preds or preds[0].get("lat") is None:
            raise AssertionError(f"HTTP {status}: {json.dumps(answer)[:200]}")
        return f"one /v1/locate request answered in {ms:.0f} ms", {"latency_ms": ms}
