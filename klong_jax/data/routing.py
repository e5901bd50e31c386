"""Recorded MoE routing (routing replay, R3): a compact wire form and per-turn alignment.

In memory a routing array is [tokens, moe_layers, k] int16, -1 where no ids were recorded
(teacher text, tokens the sampler never fed). On the wire (server response, trajectory record)
it is base64 of uint8 ids (uint16 when an id is >= 255), the dtype's max value standing for -1,
so a 46-layer, top-8 record costs 368 bytes per token before base64. numpy only (fleet-safe).
"""

from __future__ import annotations

import base64
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

MISSING = -1


def empty(n: int, layers: int, k: int) -> np.ndarray:
  """An all-missing routing array [n, layers, k] int16."""
  return np.full((n, layers, k), MISSING, np.int16)


def encode(routing: np.ndarray) -> dict[str, Any]:
  """[n, L, k] ids (-1 = missing) -> {"shape", "dtype", "data"} (base64, JSON-safe)."""
  arr = np.asarray(routing)
  if arr.ndim != 3:
    raise ValueError(f"routing must be [tokens, moe_layers, k], got shape {arr.shape}")
  top = int(arr.max()) if arr.size else 0
  dtype = np.uint8 if top < 255 else np.uint16
  if top >= np.iinfo(np.uint16).max:
    raise ValueError(f"expert id {top} does not fit uint16")
  wire = np.where(arr < 0, np.iinfo(dtype).max, arr).astype(dtype)
  return {"shape": list(arr.shape), "dtype": np.dtype(dtype).name,
          "data": base64.b64encode(wire.tobytes()).decode("ascii")}


def decode(obj: Mapping[str, Any]) -> np.ndarray:
  """The inverse of `encode`: [n, L, k] int16 with -1 where missing. Raises ValueError."""
  try:
    shape = tuple(int(s) for s in obj["shape"])
    dtype = np.dtype(str(obj["dtype"]))
    raw = base64.b64decode(obj["data"], validate=True)
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"routing must be {{shape, dtype, data}}: {e}") from None
  if dtype not in (np.uint8, np.uint16) or len(shape) != 3:
    raise ValueError(f"routing dtype {dtype} / shape {shape} not [n, L, k] uint8|uint16")
  if len(raw) != int(np.prod(shape)) * dtype.itemsize:
    raise ValueError(f"routing data has {len(raw)} bytes, shape {shape} needs "
                     f"{int(np.prod(shape)) * dtype.itemsize}")
  wire = np.frombuffer(raw, dtype).reshape(shape)
  return np.where(wire == np.iinfo(dtype).max, MISSING, wire.astype(np.int16)).astype(np.int16)


def prompt_checksum(tokens: Sequence[int] | np.ndarray) -> int:
  """CRC32 of the token ids as int32 bytes: lets the renderer check that a request's prompt is
  exactly the trajectory's prefix before using the prompt tokens' routing."""
  return zlib.crc32(np.asarray(tokens, np.int32).tobytes())


def place_turn(out: np.ndarray, record: Mapping[str, Any], tokens: Sequence[int],
               body_start: int, num_sampled: int) -> None:
  """Writes one sampled turn's recorded routing into the trajectory's `out` [n, L, k].

  `record` is the server's extension field: encoded routing of the request's tokens from
  "start" (default 0) to the end of its prompt + sampled tokens, with "prompt_len" and
  "prompt_crc32". The sampled part always lands at `body_start`; the prompt part only when the
  prompt equals `tokens[:body_start]` (the context policy may have trimmed it), overwriting
  earlier turns' ids (the latest computation of a token wins).
  """
  arr = decode(record)
  start = int(record.get("start", 0))
  p = int(record.get("prompt_len", start + arr.shape[0] - num_sampled))
  if arr.shape[1:] != out.shape[1:] or not 0 <= start <= p <= start + arr.shape[0]:
    raise ValueError(f"routing shape {arr.shape} (start {start}, prompt {p}) does not fit the "
                     f"trajectory's {out.shape[1:]}")
  sampled = arr[p - start:p - start + num_sampled]
  out[body_start:body_start + sampled.shape[0]] = sampled
  crc = record.get("prompt_crc32")
  if p == body_start and crc is not None and int(crc) == prompt_checksum(tokens[:body_start]):
    prompt = arr[:p - start]
    recorded = np.all(prompt >= 0, axis=(1, 2))
    out[start:p][recorded] = prompt[recorded]


def next_start(record: Mapping[str, Any] | None, num_sampled: int) -> int:
  """First token a follow-up request needs routing for: the previous turn's record covers its
  prompt and all its sampled tokens but the last (which no step fed back)."""
  if not record or "prompt_len" not in record:
    return 0
  return max(0, int(record["prompt_len"]) + num_sampled - 1)
