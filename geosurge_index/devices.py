"""Which torch device a command runs on: one set of rules for every `--device` flag and setting.

'auto' is CUDA when torch sees a GPU, else the CPU; 'cpu'; 'cuda' (the current GPU, or under
torchrun this process's GPU, cuda:LOCAL_RANK); 'cuda:N'. Anything else, a GPU index torch does not
see, or CUDA without a GPU is a `UserError` naming the value.
"""

from __future__ import annotations

import os

from geosurge_index.errors import UserError

EXPECTED = "expected auto, cpu, cuda or cuda:N"


def _world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        return 1


def resolve_device(device="auto", *, local_rank: int | None = None):
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' (or a torch.device) -> torch.device.

    `local_rank`: this process's GPU when `device` is 'cuda' or 'auto' without an index (default:
    under torchrun, i.e. WORLD_SIZE > 1, the LOCAL_RANK variable; otherwise none, so 'cuda' stays
    the current GPU). Under torchrun an explicit 'cuda:N' is refused: every process would take the
    same GPU.
    """
    import torch

    text = str(device).strip()
    world = _world_size()
    if local_rank is None and world > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if text == "auto":
        text = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise UserError(f"device {str(device)!r}: not a device ({EXPECTED})") from None
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type != "cuda":
        raise UserError(f"device {str(device)!r}: {EXPECTED}")
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
