"""`geosurge bench train`: speed of training steps, encoder inference and segmentation on this
machine (random weights: speed does not depend on their values)."""

from __future__ import annotations

from dataclasses import dataclass

DESCRIPTION = """\
Measure the model's speed on this machine: training steps (forward + backward + AdamW, class
maps given as if precomputed), encoder inference with class maps given, and the segmenter alone.
Weights are random (config-built from the preset or recipe, nothing downloaded): speed does not
depend on their values. Prints the machine, the method and images/s (median of the timed steps,
after warm-up steps).
"""



@dataclass(frozen=True)
class TrainBench:
    batch: int = 8  # images per step
    steps: int = 5  # timed steps per measurement
    warmup: int = 1  # untimed steps first
    cells: int = 20000  # cells per level for the geo tables
    device: str = "auto"
    threads: int = 0  # torch CPU threads (0: torch's default)
    precision: str = "auto"  # devices.autocast_dtype: auto (native bf16 else fp16 on CUDA, fp32 on CPU), bf16, fp16, fp32
    skip_segmenter: bool = False


def run_train_bench(config, name: str, settings: TrainBench) -> dict:
    """Time the model `config` (called `name` in the output) on this machine, printing the machine,
    the method and images/s; returns the figures (seconds per step or batch)."""
    import statistics
    import time

    import torch

    from geosurge_index.devices import autocast_dtype, dtype_name, resolve_device
    from geosurge_index.machine import describe_machine
    from geosurge_index.model.geosurge import GeoSurgeModel, parameter_report

    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = resolve_device(settings.device)  # UserError (not a traceback) for cuda without CUDA
    amp_dtype = autocast_dtype(device, settings.precision)
    amp = amp_dtype is not None
    print(f"machine: {describe_machine(libraries=('torch', 'transformers'))}; device {device}, "
          f"{dtype_name(amp_dtype) + ' autocast' if amp else 'fp32'}")
    torch.manual_seed(0)
    model = GeoSurgeModel(config, [settings.cells] * 7, weights=False).to(device)
    total = parameter_report(model)[-1]
    s, b = config.image_size, settings.batch
    print(f"model {name}: {s}px, fusion {'on' if config.fusion.enabled else 'off'}, segmenter {config.segmenter.kind}, "
          f"{total[1]:,} parameters ({total[2]:,} trainable), {settings.cells} cells x 7 levels; batch {b}")
    x = torch.randn(b, 3, s, s, device=device)
    cm = torch.randint(0, config.num_classes, (b, s, s), device=device) if config.fusion.enabled else None
    targets = torch.randint(0, settings.cells, (b, 7), device=device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def timed(fn) -> float:
        times = []
        for i in range(settings.warmup + settings.steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= settings.warmup:
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def train_step():
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            loss, *_ = model(x, cm, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def encode():
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
            model.encoder(x, cm)

    figures: dict = {"model": name, "device": str(device), "batch": b, "autocast": dtype_name(amp_dtype)}
    model.train()
    t = figures["train_step_s"] = timed(train_step)
    print(f"train step (forward + backward + AdamW, class maps given): {t:.3f} s/step, {b / t:.1f} img/s")
    model.eval()
    t = figures["encode_s"] = timed(encode)
    print(f"encoder inference (class maps given): {t:.3f} s/batch, {b / t:.1f} img/s")
    if config.fusion.enabled and model.encoder.segmenter is not None and not settings.skip_segmenter:
        def segment():
            with torch.inference_mode(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                model.encoder.segment(x)

        t = figures["segment_s"] = timed(segment)
        print(f"segmenter {config.segmenter.kind} at {config.segmenter.input_size}px: {t:.3f} s/batch, {b / t:.1f} img/s")
    print(f"method: median of {settings.steps} timed steps after {settings.warmup} warm-up step(s); random weights")
    return figures
