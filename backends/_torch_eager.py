"""What the eager CPU kernels of torch (``torch.fused``, ``torch.blocked``) decline alike."""

from __future__ import annotations

__all__ = ["declines"]


def declines(a, why_cpu: str) -> str | None:
    """The reason a CPU-only eager kernel cannot take tensor ``a``, or ``None``.

    Other devices (``why_cpu`` says why the kernel is CPU-only), autograd
    recording, torch.compile tracing and torch.func transforms: the
    derivative rules and the traced forms are other kernels' work.
    """
    import torch

    if not a.is_cpu:  # 0.05 us; a.device.type builds a device object (0.28 us)
        return f"device {a.device.type} ({why_cpu})"
    if torch.is_grad_enabled() and a.requires_grad:
        return "autograd active (input requires grad)"
    if torch.compiler.is_compiling():  # first: Dynamo cannot trace the functorch checks
        return "inside torch.compile tracing"
    if torch._C._functorch.is_functorch_wrapped_tensor(a) or torch._C._are_functorch_transforms_active():
        return "inside a torch.func transform"
    return None
