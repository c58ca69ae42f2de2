"""Where and in what precision to run: one resolution of device and dtype names for the
pipeline, ``keyseg eval`` and training.

``resolve_device("auto")`` picks CUDA > MPS > CPU and refuses, in one line, a named device
this machine cannot use; ``resolve_dtype(name, device)`` maps ``fp32``/``bf16``/``fp16`` (or
``float32``/``bfloat16``/``float16``) to a torch dtype, with one default per device.
"""

from __future__ import annotations

import torch

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


#: Dtype names accepted everywhere (configs, ``--dtype``), short and torch spellings.
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``dtype`` as given (a torch dtype or one of :data:`DTYPES`' names), else (None or
    ``"auto"``) bf16 on CUDA (fp16 where bf16 is unsupported) and fp32 elsewhere.

    Raises:
        KeySegConfigError: an unknown name (one line listing the known ones).
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None and str(dtype).lower() != "auto":
        if str(dtype).lower() not in DTYPES:
            raise KeySegConfigError(f"unknown dtype {dtype!r} (use one of {', '.join(DTYPES)})")
        return DTYPES[str(dtype).lower()]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32
