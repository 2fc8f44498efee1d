"""Transport precision: adapter tensors cast for the wire, and back to float32.

Flower's ArrayRecord serializes through numpy, which has no bfloat16, so a bfloat16
tensor travels as its uint16 bit pattern. The array alone does not say which it is:
the server names the precision in every train message (config 'transport-dtype'),
the client replies in the same one, and the server checks that it did.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from common.config import TRANSPORT_DTYPES

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The numpy dtype each transport dtype has on the wire (ArrayRecord's Array.dtype).
WIRE_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}


def _check(dtype: str) -> None:
    if dtype not in TRANSPORT_DTYPES:
        raise ValueError(f"transport dtype must be one of {', '.join(TRANSPORT_DTYPES)}; "
                         f"got {dtype!r}")


def to_wire(tensor: torch.Tensor, dtype: str) -> np.ndarray:
    """``tensor`` cast to ``dtype`` (round to nearest even, as torch casts), as numpy."""
    _check(dtype)
    cast = tensor.detach().cpu().to(_TORCH_DTYPES[dtype]).contiguous()
    return cast.view(torch.uint16).numpy() if dtype == "bfloat16" else cast.numpy()


def from_wire(array: np.ndarray, dtype: str) -> torch.Tensor:
    """A float32 tensor from a wire array; refuses an array not in ``dtype``'s wire form."""
    _check(dtype)
    if array.dtype != np.dtype(WIRE_DTYPES[dtype]):
        raise ValueError(f"array has dtype {array.dtype}, but transport dtype {dtype!r} "
                         f"travels as {WIRE_DTYPES[dtype]}")
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if dtype == "bfloat16":
        tensor = tensor.view(torch.bfloat16)
    return tensor.to(torch.float32)


def encode_state(state: Mapping[str, torch.Tensor], dtype: str) -> dict[str, np.ndarray]:
    return {name: to_wire(tensor, dtype) for name, tensor in state.items()}


def decode_state(arrays: Mapping[str, np.ndarray], dtype: str) -> dict[str, torch.Tensor]:
    return {name: from_wire(array, dtype) for name, array in arrays.items()}
