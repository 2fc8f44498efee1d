"""Compute precision: bf16 where the hardware multiplies it natively, fp32 elsewhere.

The base weights are loaded in the run's dtype; the LoRA weights, their gradients, the
optimizer state and the loss stay float32 whatever it is (peft keeps adapters in
float32 over a 16-bit base, ``autocast_adapter_dtype``; ``token_nll`` upcasts the
logits). Forward and backward run under ``torch.autocast`` so that the float32 LoRA
weights and the 16-bit activations meet in 16-bit matrix products: on a CPU with AMX
or AVX-512 BF16 a bf16 matmul runs ~4x faster than fp32 (docs/benchmarks.md, speed).
"""

from __future__ import annotations

import contextlib
import functools

import torch

DTYPE_AUTO = "auto"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when this CPU multiplies bf16 in hardware (AMX tiles or AVX-512 BF16).

    torch's own probes (the same its oneDNN kernels dispatch on); without them bf16 is
    emulated and slower than fp32."""
    probes = (getattr(torch.cpu, "_is_amx_tile_supported", None),
              getattr(torch.cpu, "_is_avx512_bf16_supported", None))
    return any(probe is not None and probe() for probe in probes)


def resolve_dtype(name: str, device: torch.device | str, *, dp_sgd: bool = False) -> str:
    """The base-weight and compute dtype that ``name`` means on ``device``.

    'auto' is 'bfloat16' on a CUDA GPU that supports it or a CPU with native bf16
    (:func:`cpu_has_native_bf16`), else 'float32'; under DP-SGD it stays 'float32'
    (Opacus clips per-sample gradients computed from the saved activations, and its
    grad samplers assume one dtype per layer). Other names pass through.
    """
    if name != DTYPE_AUTO:
        return name
    if dp_sgd:
        return "float32"
    device = torch.device(device)
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if device.type == "cpu" and cpu_has_native_bf16() else "float32"


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of the model's frozen (base) floating weights: what it computes in."""
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point():
            return param.dtype
    return next(model.parameters()).dtype


def autocast(model: torch.nn.Module):
    """``torch.autocast`` to the base weights' dtype when it is 16-bit, else a no-op.

    Wrap forward passes (the loss, evaluation, generation) in it; ``backward`` runs
    outside, as torch's AMP recipe says. Raises nothing: an fp32 model is left as is."""
    dtype = compute_dtype(model)
    if dtype not in (torch.bfloat16, torch.float16):
        return contextlib.nullcontext()
    device = next(model.parameters()).device
    return torch.autocast(device.type, dtype=dtype)


# Sequences up to this many tokens train faster with eager attention in bf16 on a CPU.
EAGER_ATTENTION_MAX_LENGTH = 256


def attention_for(dtype: str, device: torch.device | str, max_length: int) -> str | None:
    """The ``attn_implementation`` to load a model with, or None for transformers' default.

    On a CPU in bf16, torch's flash-attention kernel has a slow backward (0.66 of a
    2.3 s training step of the demo, torch profiler): eager attention made the step
    1.8x faster (2.66 -> 1.46 CPU s), while in fp32 SDPA stays faster (2.74 against
    3.27). Eager keeps (batch, heads, length, length) scores per layer, so only short
    sequences (<= EAGER_ATTENTION_MAX_LENGTH tokens) use it."""
    if (dtype in ("bfloat16", "float16") and torch.device(device).type == "cpu"
            and max_length <= EAGER_ATTENTION_MAX_LENGTH):
        return "eager"
    return None
