"""A GPT-2-architecture causal transformer with a preallocated, slot-indexed KV cache.

Learned positions, pre-LayerNorm blocks, a GELU MLP four times as wide, and the output
projection tied to the token embedding; parameter names follow GPT-2's (c_attn, c_proj, c_fc,
ln_1, ...), so Hugging Face GPT-2 checkpoints map onto it one to one (transposing Conv1D).

Three ways through the same blocks:
- `forward` / `logits`: the whole sequence at once (training, scoring), causal attention;
- `prefill`: whole prompts at once, also writing each layer's keys and values into the cache;
- `decode`: one new token per sequence, attending over its cached keys and values: O(L) work per
  token instead of recomputing the prefix, O(L^2).

The cache holds `slots` sequences, each with its own length, so sequences of different requests
at different positions decode together in one batched step, a finished sequence's slot is reused
by the next request, and beam search reorders hypotheses by copying slots.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genserve.models.linear import linear, uses_onednn
from genserve.models.lm import next_token_loss


@dataclass
class GPTConfig:
    vocab_size: int
    context_length: int = 256  # learned positions: the longest sequence the model takes
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True
    activation: Literal["gelu_tanh", "gelu"] = "gelu_tanh"  # GPT-2 uses the tanh approximation
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


def dense(layer: nn.Linear, x: Tensor) -> Tensor:
    """layer(x) on the faster matrix library where no gradient is wanted (models/linear.py)."""
    return linear(x, layer.weight, layer.bias)


class KVCache:
    """Keys and values of every layer for `slots` sequences of up to `max_len` tokens.

    k, v: (n_layer, slots, n_head, max_len, head_dim), allocated once. lengths[s] is how many
    tokens slot s holds; positions at or past it are stale and never attended to."""

    def __init__(self, config: GPTConfig, slots: int, max_len: int, dtype: torch.dtype, device: torch.device):
        shape = (config.n_layer, slots, config.n_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=device)

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def bytes_per_token(self) -> int:
        """Cache bytes one token of one sequence takes: 2 x layers x d_model x element size."""
        n_layer, _, n_head, _, head_dim = self.k.shape
        return 2 * n_layer * n_head * head_dim * self.k.element_size()

    def copy_slots(self, src: Tensor, dst: Tensor) -> None:
        # Only the filled positions are copied: a beam-search step reorders its beams this way, and
        # copying all max_len positions would cost as much as the whole cache every token.
        moved = src != dst
        if not bool(moved.any()):
            return
        src, dst = src[moved], dst[moved]
        used = int(self.lengths[src].max())
        # Indexing with src makes a copy first, so overlapping src and dst (beam reorders) are safe.
        self.k[:, dst, :, :used] = self.k[:, src, :, :used]
        self.v[:, dst, :, :used] = self.v[:, src, :, :used]
        self.lengths[dst] = self.lengths[src]


@dataclass
class DecodeLayout:
    """Where one decode step reads and writes the cache, worked out once per step for every layer.

    The common cases take no copies: when the slots are a contiguous block (a single sequence, or
    requests admitted together) the cached keys are read as a view instead of gathered, and when
    every sequence is at the same position the new keys are written with a plain slice and no mask
    is needed (every cached position up to it is visible)."""

    slots: Tensor  # (B,)
    positions: Tensor  # (B,) where each sequence's new token goes
    span: int  # positions attended to: the longest live prefix
    block: slice | None  # the slots as a slice when they are contiguous
    position: int | None  # the one position when all sequences share it
    visible: Tensor | None  # (B, 1, 1, span) bool mask, None when all of span is visible to all

    @classmethod
    def of(cls, slots: Tensor, positions: Tensor) -> DecodeLayout:
        slot_list, pos_list = slots.tolist(), positions.tolist()
        span = max(pos_list) + 1
        first = slot_list[0]
        contiguous = slot_list == list(range(first, first + len(slot_list)))
        block = slice(first, first + len(slot_list)) if contiguous else None
        position = pos_list[0] if min(pos_list) == max(pos_list) else None
        visible = None
        if position is None:
            visible = (torch.arange(span, device=positions.device) <= positions[:, None])[:, None, None, :]
        return cls(slots, positions, span, block, position, visible)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def _heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        B, T, C = x.shape
        q, k, v = dense(self.c_attn, x).split(C, dim=2)
        return tuple(t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))

    def _out(self, y: Tensor) -> Tensor:
        B, _, T, _ = y.shape
        return self.resid_dropout(dense(self.c_proj, y.transpose(1, 2).reshape(B, T, -1)))

    def forward(self, x: Tensor) -> Tensor:
        """Causal attention over the sequence itself (training, scoring)."""
        q, k, v = self._heads(x)
        p = self.dropout if self.training else 0.0
        return self._out(F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True))

    def prefill(self, x: Tensor, cache_k: Tensor, cache_v: Tensor, slots: Tensor) -> Tensor:
        """As forward, also storing keys and values at positions 0..T-1 of each slot. Right padding
        is harmless: causal attention keeps real tokens from seeing it, and the slot's length
        marks the padded positions stale."""
        q, k, v = self._heads(x)
        T = x.shape[1]
        cache_k[slots, :, :T] = k
        cache_v[slots, :, :T] = v
        return self._out(F.scaled_dot_product_attention(q, k, v, is_causal=True))

    def decode(self, x: Tensor, cache_k: Tensor, cache_v: Tensor, at: DecodeLayout) -> Tensor:
        """One token per slot at `at.positions`; attends over the slot's cache up to and including it.
        Written for few operations per token (it runs once per layer per generated token): q, k and
        v are read off one (B, 3, H, hd) view, and dropout, inactive at inference, is skipped."""
        B, _, C = x.shape
        qkv = dense(self.c_attn, x).view(B, 3, self.n_head, self.head_dim)
        k, v = qkv[:, 1], qkv[:, 2]  # (B, H, hd)
        if at.block is not None and at.position is not None:
            cache_k[at.block, :, at.position] = k
            cache_v[at.block, :, at.position] = v
        else:
            cache_k[at.slots, :, at.positions] = k
            cache_v[at.slots, :, at.positions] = v
        if at.block is not None:
            keys, values = cache_k[at.block, :, : at.span], cache_v[at.block, :, : at.span]  # views
        else:
            keys, values = cache_k[at.slots, :, : at.span], cache_v[at.slots, :, : at.span]  # gathers
        y = F.scaled_dot_product_attention(qkv[:, 0, :, None], keys, values, attn_mask=at.visible)  # (B, H, 1, hd)
        return dense(self.c_proj, y.reshape(B, 1, C))  # one query per sequence: (H, 1, hd) is already (1, C) in order


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.approximate = "tanh" if config.activation == "gelu_tanh" else "none"
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.decode(x))

    def decode(self, x: Tensor) -> Tensor:
        """forward without dropout, for inference (one module call fewer per layer and token)."""
        return dense(self.c_proj, F.gelu(dense(self.c_fc, x), approximate=self.approximate))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.context_length: int | None = config.context_length
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.context_length, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied input and output embeddings
        self._output_t: Tensor | None = None  # see _next_token_logits
        self._output_key: tuple[int, int] | None = None
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled down by the depth, so the residual stream's variance
        # does not grow with the number of layers.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights counted once

    def _check_length(self, T: int) -> None:
        if self.config.context_length < T:
            raise ValueError(f"sequence of {T} tokens is longer than the context length "
                             f"{self.config.context_length}")

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(B, T) tokens -> (B, T, vocab) logits, and the mean cross-entropy if targets are given."""
        logits = self.lm_head(self.hidden_states(idx))
        return logits, None if targets is None else next_token_loss(logits, targets)

    def hidden_states(self, idx: Tensor) -> Tensor:
        """(B, T) tokens -> (B, T, n_embd): the final layer's normalised output at each position, what the head
        reads to predict the next token (the text knn score's features)."""
        self._check_length(idx.shape[1])
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        return self.ln_f(x)

    # ---- the LanguageModel interface (models/lm.py) -------------------------------------------

    def logits(self, tokens: Tensor) -> Tensor:
        return self(tokens)[0]

    def allocate(self, slots: int, max_len: int) -> KVCache:
        if max_len > self.config.context_length:
            raise ValueError(f"max_len {max_len} exceeds the context length {self.config.context_length}")
        weight = self.wte.weight
        return KVCache(self.config, slots, max_len, weight.dtype, weight.device)

    def prefill(self, state: KVCache, slots: Tensor, tokens: Tensor, lengths: Tensor) -> Tensor:
        B, T = tokens.shape
        if state.max_len < T:
            raise ValueError(f"prompt of {T} tokens does not fit the cache's {state.max_len} positions")
        pos = torch.arange(T, device=tokens.device)
        x = self.wte(tokens) + self.wpe(pos)
        for i, block in enumerate(self.h):
            x = x + block.attn.prefill(block.ln_1(x), state.k[i], state.v[i], slots)
            x = x + block.mlp(block.ln_2(x))
        last = x[torch.arange(B, device=x.device), lengths - 1]  # only the last real token's logits
        state.lengths[slots] = lengths
        return self._next_token_logits(self.ln_f(last))

    def decode(self, state: KVCache, slots: Tensor, tokens: Tensor) -> Tensor:
        positions = state.lengths[slots]
        # Attend over the longest live prefix only; shorter rows mask the rest out.
        at = DecodeLayout.of(slots, positions)
        if at.span > state.max_len:
            raise ValueError(f"a sequence reached the cache's {state.max_len} positions")
        x = (self.wte(tokens) + self.wpe(positions))[:, None, :]  # (B, 1, C)
        for i, block in enumerate(self.h):
            x = x + block.attn.decode(block.ln_1(x), state.k[i], state.v[i], at)
            x = x + block.mlp.decode(block.ln_2(x))
        logits = self._next_token_logits(self.ln_f(x[:, 0]))
        # Advanced only once the step has succeeded: a failed step can be rerun (service/decoding.py).
        state.lengths[slots] = positions + 1
        return logits

    def _next_token_logits(self, h: Tensor) -> Tensor:
        """(B, C) -> (B, vocab) for decoding: the output projection, the largest matrix of a small
        model. On the CPU, where the product is large enough for oneDNN (models/linear.py), that
        reads the (vocab, C) weight fastest; smaller ones go to MKL, which multiplies a few rows by
        the (C, vocab) transpose of the tied embedding markedly faster than by the weight itself, so
        a contiguous transpose is kept, rebuilt whenever the weight changes. On CUDA either layout
        is as fast."""
        weight = self.lm_head.weight
        if weight.device.type != "cpu" or uses_onednn(h, weight):
            return linear(h, weight)
        try:
            key = (weight.data_ptr(), weight._version)
        except RuntimeError:  # an inference tensor has no version counter, and never changes in place
            key = (weight.data_ptr(), -1)
        if self._output_key != key:
            self._output_t = weight.detach().t().contiguous()
            self._output_key = key
        return h @ self._output_t

    def copy_slots(self, state: KVCache, src: Tensor, dst: Tensor) -> None:
        state.copy_slots(src, dst)
