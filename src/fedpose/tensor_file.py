"""safetensors files written from the tensors' own memory.

`safetensors.torch.save` builds the whole file as one bytes object: every tensor is copied once
more before it reaches the disk, and every tensor costs a few Python checks. `safetensors_parts`
gives the same format as parts, a header and then each tensor's memory as it is, for a writer
that takes parts (fedpose.run_dir: write_file, write_new_file). The files written every round
use it: client state (one file per trained client) and checkpoints. Reading stays with the
safetensors library, which checks the header, the dtypes and every byte range.

This module imports nothing of fedpose but run_dir's Buffer type, so every layer may use it.
"""

from __future__ import annotations

import json
import struct
import sys

import torch
from safetensors.torch import save

from fedpose.run_dir import Buffer

# the dtype names of the safetensors header
SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def safetensors_parts(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> list[Buffer]:
    """`tensors` and `metadata` as a safetensors file in parts: the header (its length as a
    little-endian u64, then JSON naming each tensor's dtype, shape and byte range, padded with
    spaces to 8 bytes), then each tensor's bytes, read from its memory (a tensor on an
    accelerator, or not contiguous, is copied first). Tensors may share memory: each is
    written whole. Elsewhere than on a little-endian machine, or for a dtype the table lacks,
    the library writes the file."""
    plain = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    if sys.byteorder != "little" or any(t.dtype not in SAFETENSORS_DTYPES for t in plain.values()):
        # the library refuses tensors that share memory: each gets its own
        return [save({name: t.clone() for name, t in plain.items()}, metadata=metadata)]
    header: dict = {"__metadata__": metadata}
    data: list[Buffer] = []
    offset = 0
    for name, t in plain.items():
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        data.append(_memory(t))
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return [struct.pack("<Q", len(text)) + text, *data]


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The bytes of a tensor in memory order, read in place (copied only when the tensor is
    not contiguous or not on the CPU)."""
    return _memory(t.detach().cpu().contiguous())


def _memory(t: torch.Tensor) -> memoryview:
    # the memory of a contiguous CPU tensor, as bytes
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())
