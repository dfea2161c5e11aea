"""Where a model runs and in which dtype: ``auto`` picks the GPU and bfloat16 when there is one."""
import torch

__all__ = ["resolve_device", "resolve_dtype"]


def resolve_device(device=None) -> torch.device:
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device {device!r}: use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} asked for, but torch sees no CUDA GPU here "
                         "(use --device cpu or auto)")
    return device


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if gpu_bf16 else torch.float32
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype {dtype!r}: use float32, bfloat16, float16 or auto")
        return getattr(torch, dtype)
    return dtype
