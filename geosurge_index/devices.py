"""Which torch device a command runs on, and what runs there: one set of rules for every
`--device` flag and setting.

'auto' is CUDA when torch sees a GPU, else the CPU; 'cpu'; 'cuda' (the current GPU, or under
torchrun this process's GPU, cuda:LOCAL_RANK); 'cuda:N'. Anything else, a GPU index torch does not
see, or CUDA without a GPU is a `UserError` naming the value.

Also here, so that inference, training and the benchmarks agree: the autocast dtype for a device
(`autocast_dtype`: bf16 only where the GPU has it natively, else fp16), the device context that
makes a GPU current (`on_device`: pinned host memory and new CUDA state land on it, not on GPU 0),
and the memory free on a device (`free_memory`).
"""

from __future__ import annotations

import contextlib
import os

from geosurge_index.errors import UserError

EXPECTED = "expected auto, cpu, cuda or cuda:N"


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return 1


def parse_device(device):
    """'cpu' | 'cuda' | 'cuda:N' (or a torch.device) -> torch.device, checking only the spelling
    (not whether this machine has that GPU: a Ray driver decides for its actors' machines)."""
    import torch

    text = str(device).strip()
    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"device {str(device)!r}: not a device ({EXPECTED})") from None
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device {str(device)!r}: {EXPECTED}")
    return torch.device("cpu") if dev.type == "cpu" else dev


def resolve_device(device="auto", *, local_rank: int | None = None):
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' (or a torch.device) -> torch.device.

    `local_rank`: this process's GPU when `device` is 'cuda' or 'auto' without an index (default:
    under torchrun, i.e. WORLD_SIZE > 1, the LOCAL_RANK variable; otherwise none, so 'cuda' stays
    the current GPU). Under torchrun an explicit 'cuda:N' is refused: every process would take the
    same GPU.
    """
    import torch

    world = _world_size()
    if local_rank is None and world > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if str(device).strip() == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = parse_device(device)
    if dev.type == "cpu":
        return dev
    if not torch.cuda.is_available():
        raise UserError(f"device {str(device)!r}: torch sees no CUDA device")
    if dev.index is None:
        if local_rank is not None:
            dev = torch.device("cuda", local_rank)
    elif world > 1:
        raise UserError(f"device {str(device)!r} under torchrun ({world} processes): every process would "
                        "use that one GPU; give 'cuda' or 'auto' and each process takes cuda:LOCAL_RANK")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise UserError(f"device {str(device)!r} -> {dev}: torch sees {count} CUDA device(s), "
                        f"cuda:0..cuda:{count - 1}")
    return dev


# -- what runs on a device -----------------------------------------------------------------------

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


def native_bf16(device) -> bool:
    """Whether `device` (a CUDA device) computes bf16 natively (compute capability 8.0+, or ROCm).
    Emulated bf16 (V100, T4) is slower than fp32 and fails in some kernels: it does not count."""
    import torch

    with on_device(device):
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))


def autocast_dtype(device, precision: str = "auto"):
    """The autocast dtype for `device` under `precision`, or None for fp32 (no autocast); the one
    rule for inference, training and the benchmarks.

    auto: on CUDA bf16 where the GPU has it natively, else fp16; on the CPU fp32 (bf16 autocast is
    ~5x slower there). bf16 on a GPU without native bf16 is a UserError naming the way out. fp16
    training needs a gradient scaler (the trainer adds one); the fp32 islands (logits, the
    segmenter's class scores, the final normalisation) stay fp32 under either dtype.
    """
    import torch

    device = torch.device(device)
    if precision not in PRECISIONS:
        raise UserError(f"precision {precision!r}: expected {', '.join(PRECISIONS)}")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda" and not native_bf16(device):
        if precision == "bf16":
            raise UserError(f"precision bf16: {device} has no native bf16 (compute capability below 8.0); "
                            "use auto (fp16 there) or fp32")
        return torch.float16
    return torch.bfloat16


def dtype_name(dtype) -> str:
    """None -> 'fp32', torch.bfloat16 -> 'bf16', torch.float16 -> 'fp16' (for log lines)."""
    import torch

    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def on_device(device):
    """A context in which `device` is the current CUDA device (a no-op for the CPU or an index-less
    'cuda'): pinned buffers, the DataLoader's pinning thread and lazily created CUDA state then go
    to that GPU instead of opening a context on GPU 0."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or device.index is None:
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def free_memory(device) -> int:
    """Bytes that tensors on `device` can still take: on CUDA the driver's free memory plus what
    torch's caching allocator holds unused (cudaMemGetInfo counts that as taken); on the CPU
    MemAvailable (0 when unknown)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(0, cached))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def synchronize(device) -> None:
    """Wait for `device`'s queued work (a no-op off CUDA): the GPU of `device`, not GPU 0."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
