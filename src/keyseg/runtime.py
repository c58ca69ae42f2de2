"""Where and in what precision to run: one resolution of device and dtype names for the
pipeline, ``keyseg eval`` and training.

``resolve_device("auto")`` picks CUDA > MPS > CPU and refuses, in one line, a named device
this machine cannot use; ``resolve_dtype(name, device)`` maps ``fp32``/``bf16``/``fp16`` (or
``float32``/``bfloat16``/``float16``) to a torch dtype, with one default per device.
"""

from __future__ import annotations

import torch

from keyseg.dtypes import torch_dtype_name
from keyseg.errors import KeySegConfigError


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as given (checked to exist here), else the best available: CUDA > MPS > CPU.

    Raises:
        KeySegConfigError: the name is not a device, or this machine / torch build has no
            such device (one line naming it and what is available).
    """
    if device is not None and str(device) != "auto":
        try:
            target = torch.device(device)
        except (RuntimeError, TypeError) as error:
            raise KeySegConfigError(
                f"--device {device!r}: not a torch device name (use cpu, cuda, cuda:N or mps)"
            ) from error
        _check_device_available(target)
        return target
    if torch.cuda.is_available():
        return torch.device("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _check_device_available(device: torch.device) -> None:
    """Refuse a CUDA / MPS device this process cannot use, in one line."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no visible GPU"
            raise KeySegConfigError(
                f"--device {device}: CUDA is not available ({build}, torch "
                f"{torch.__version__}); use --device cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise KeySegConfigError(
                f"--device {device}: only {count} CUDA device(s) (cuda:0..cuda:{count - 1})"
            )
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise KeySegConfigError(
                f"--device {device}: MPS (Apple GPU) is not available on this machine; "
                "use --device cpu"
            )


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``dtype`` as given (a torch dtype, or any spelling :func:`keyseg.config.dtype_name`
    reads: fp32/bf16/fp16 or float32/bfloat16/float16), else (None or ``"auto"``) bf16 on
    CUDA (fp16 where bf16 is unsupported) and fp32 elsewhere.

    Raises:
        KeySegConfigError: an unknown name (one line listing the known ones).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    name = torch_dtype_name(dtype) if dtype is not None else None
    if name is not None:
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def check_process_group(num_processes: int) -> None:
    """Refuse a launch whose processes do not see each other.

    Under ``accelerate launch`` / ``torchrun`` on a machine with no GPU, Accelerate sets up a
    group only with ``--cpu`` (``ACCELERATE_USE_CPU=1``); without it every process thinks it
    is alone, and a training run would write the same directory N times over.

    Args:
        num_processes: what Accelerate set up (``accelerator.num_processes``).
    """
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and num_processes != world:
        raise KeySegConfigError(
            f"WORLD_SIZE={world} but Accelerate set up {num_processes} process(es) "
            "(on CPU launch with `accelerate launch --cpu` or set ACCELERATE_USE_CPU=1)")
