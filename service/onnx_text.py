"""The transformer on ONNX Runtime: the `LanguageModel` interface (models/lm.py) on the two graphs that
training/onnx_export.py writes (prefill.onnx and decode.onnx).

The graphs are stateless: the past keys and values go in and the new ones come out. The KV cache is owned here,
laid out like models/gpt.py's `KVCache` ((n_layer, slots, n_head, max_len, head_dim) plus a length per slot), as
numpy arrays in host memory:
- `prefill` runs the prompt graph and writes each prompt's keys and values into its slot;
- `decode` gathers each slot's past up to the longest live length, masks the positions a shorter slot does not
  have, runs the one-token graph and writes the new keys and values at each slot's position;
- `copy_slots` copies slots (forks of a prompt, beam reorders).

On CUDA the graphs run on the GPU and the cache stays in host memory, so each step copies the gathered past to
the device: simple and correct, not the fastest layout.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from genserve.models.gpt import GPTConfig
from genserve.service.onnx_session import open_session, session_device


def _numpy(x: Tensor | np.ndarray | list[int], dtype: type = np.int64) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _torch(x: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))


class OnnxKVCache:
    """Keys and values of every layer for `slots` sequences of up to `max_len` tokens, in host memory.

    k, v: (n_layer, slots, n_head, max_len, head_dim) float32; lengths[s] is how many tokens slot s holds."""

    def __init__(self, config: GPTConfig, slots: int, max_len: int):
        shape = (config.n_layer, slots, config.n_head, max_len, config.head_dim)
        self.k = np.zeros(shape, dtype=np.float32)
        self.v = np.zeros(shape, dtype=np.float32)
        self.lengths = np.zeros(slots, dtype=np.int64)

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def copy_slots(self, src: np.ndarray, dst: np.ndarray) -> None:
        # Fancy indexing copies first, so overlapping src and dst (beam reorders) are safe.
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]
        self.lengths[dst] = self.lengths[src]


class OnnxGPT:
    """A GPT on ONNX Runtime. `device` "cuda" uses the CUDA execution provider when this onnxruntime has it;
    `.device` says what was actually chosen ("cuda" or "cpu")."""

    def __init__(self, prefill: bytes, decode: bytes, config: GPTConfig, device: str = "cpu"):
        self.config = config
        self.vocab_size = config.vocab_size
        self.context_length: int | None = config.context_length
        self._prefill = open_session(prefill, device)
        self._decode = open_session(decode, device)
        self.device = session_device(self._decode)

    def _check_length(self, T: int) -> None:
        if self.config.context_length < T:
            raise ValueError(f"sequence of {T} tokens is longer than the context length {self.config.context_length}")

    def _run_prefill(self, tokens: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        tokens = _numpy(tokens)
        if tokens.ndim != 2 or tokens.shape[1] < 1:
            raise ValueError(f"tokens must be (batch, length) with length >= 1, got shape {tokens.shape}")
        self._check_length(tokens.shape[1])
        logits, keys, values = self._prefill.run(None, {"tokens": tokens})
        return logits, keys, values

    # ---- the LanguageModel interface (models/lm.py) -------------------------------------------

    def logits(self, tokens: Tensor) -> Tensor:
        return _torch(self._run_prefill(tokens)[0])

    def allocate(self, slots: int, max_len: int) -> OnnxKVCache:
        if max_len > self.config.context_length:
            raise ValueError(f"max_len {max_len} exceeds the context length {self.config.context_length}")
        return OnnxKVCache(self.config, slots, max_len)

    def prefill(self, state: OnnxKVCache, slots: Tensor, tokens: Tensor, lengths: Tensor) -> Tensor:
        slots, lengths = _numpy(slots), _numpy(lengths)
        T = tokens.shape[1]
        if state.max_len < T:
            raise ValueError(f"prompt of {T} tokens does not fit the cache's {state.max_len} positions")
        logits, keys, values = self._run_prefill(tokens)
        # One advanced index (the slots) among slices keeps its place: the target is (L, B, H, T, hd).
        state.k[:, slots, :, :T] = keys
        state.v[:, slots, :, :T] = values
        state.lengths[slots] = lengths
        return _torch(logits[np.arange(len(slots)), lengths - 1])  # the last real token's logits

    def decode(self, state: OnnxKVCache, slots: Tensor, tokens: Tensor) -> Tensor:
        slots = _numpy(slots)
        positions = state.lengths[slots]
        if int(positions.max()) + 1 > state.max_len:
            raise ValueError(f"a sequence reached the cache's {state.max_len} positions")
        # The longest live prefix only; shorter rows mask the rest out. A slot that was never filled has an empty
        # past: one masked-out position stands in for it (the graph takes P >= 1).
        span = max(int(positions.max()), 1)
        feeds = {
            "tokens": _numpy(tokens),
            "positions": positions,
            "past_keys": state.k[:, slots, :, :span],
            "past_values": state.v[:, slots, :, :span],
            "past_mask": np.arange(span)[None, :] < positions[:, None],
        }
        logits, new_keys, new_values = self._decode.run(None, feeds)
        # Two advanced indices apart (slots, positions) put their dimension first: the target is (B, L, H, hd).
        state.k[:, slots, :, positions] = new_keys[:, :, :, 0].transpose(1, 0, 2, 3)
        state.v[:, slots, :, positions] = new_values[:, :, :, 0].transpose(1, 0, 2, 3)
        state.lengths[slots] = positions + 1
        return _torch(logits)

    def copy_slots(self, state: OnnxKVCache, src: Tensor, dst: Tensor) -> None:
        state.copy_slots(_numpy(src), _numpy(dst))
