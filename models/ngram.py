"""Count-based n-gram language model with interpolated Kneser-Ney smoothing.

For the highest order n and a context h of n-1 tokens, with raw counts c:

    P(w | h) = max(c(h w) - D, 0) / c(h) + D * N1+(h .) / c(h) * P(w | h')

where h' drops the oldest token of h and N1+(h .) is the number of distinct tokens seen after h.
Lower orders use the same formula with *continuation counts* N1+(. h' w) (the number of distinct
tokens seen before h' w) in place of raw counts: a lower order is only consulted to back a longer
context up, so it should reward words that follow many contexts, not words that are frequent in
one ("Francisco"). The recursion ends at the uniform distribution 1/V, so every token has
probability > 0 and every conditional sums to 1. A context never seen at some order passes the
lower order's distribution through unchanged.

Tables are sparse, one per order k = 1..n (context length k-1), as tensors registered as buffers:
sorted context keys (the context as a base-V number), CSR row pointers into the entries, and per
entry the next token and its (raw or continuation) count. A batch of contexts is looked up with
one torch.searchsorted per order. The shapes depend on the data: `NGramLM(config)` starts with
empty tables and `load_state_dict` resizes them to the incoming tensors, so
`NGramLM.from_state_dict(config, state_dict)` (or a plain load_state_dict) rebuilds a fitted model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Context keys are base-V numbers held in int64; keep a bit of headroom below 2^63.
MAX_KEY = 2**62


@dataclass(frozen=True)
class NGramConfig:
    vocab_size: int
    order: int = 5  # n: each prediction conditions on up to n-1 previous tokens
    discount: float = 0.75  # D, absolute discount of every order

    def __post_init__(self) -> None:
        if self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}")
        if self.order < 1:
            raise ValueError(f"order must be >= 1, got {self.order}")
        # D in (0, 1]: D > 0 leaves mass for unseen tokens, D <= 1 keeps max(c - D, 0) = c - D for
        # every count >= 1, which is what makes the discounted mass exactly D * N1+(h .).
        if not 0.0 < self.discount <= 1.0:
            raise ValueError(f"discount must be in (0, 1], got {self.discount}")
        if self.vocab_size ** (self.order - 1) >= MAX_KEY:
            raise ValueError(
                f"vocab_size^(order-1) = {self.vocab_size}^{self.order - 1} does not fit a 62-bit context key; "
                "lower the order"
            )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class NGramState:
    """Decoding state: the last n-1 tokens of each slot, right-aligned (column -1 is the newest),
    and how many tokens each slot has read (only the last min(length, n-1) columns are real)."""

    history: Tensor  # (slots, n-1) int64
    lengths: Tensor  # (slots,) int64


class CountTable(nn.Module):
    """The counts of one order, sparse: for each seen context (sorted by key) a CSR row of
    (next token, count) entries, and the row's total count."""

    def __init__(self) -> None:
        super().__init__()
        empty = torch.zeros(0, dtype=torch.int64)
        self.register_buffer("ctx_keys", empty.clone())  # (C,) sorted base-V context keys
        self.register_buffer("row_ptr", torch.zeros(1, dtype=torch.int64))  # (C+1,) entry ranges
        self.register_buffer("next_token", empty.clone())  # (E,) sorted within each row
        self.register_buffer("count", empty.clone())  # (E,) >= 1
        self.register_buffer("ctx_total", empty.clone())  # (C,) sum of the row's counts

    def store(self, ctx_key: Tensor, next_token: Tensor, count: Tensor) -> None:
        """Fill from per-entry (context key, next token, count), sorted by (context, next token);
        entries with count 0 are dropped."""
        if not bool((count > 0).all()):
            keep = (count > 0).nonzero().squeeze(1)
            ctx_key, next_token, count = ctx_key[keep], next_token[keep], count[keep]
        self.next_token, self.count = next_token, count
        self.ctx_keys, row_of_entry, row_sizes = torch.unique_consecutive(
            ctx_key, return_inverse=True, return_counts=True
        )
        self.row_ptr = F.pad(torch.cumsum(row_sizes, 0), (1, 0))
        self.ctx_total = torch.zeros_like(self.ctx_keys).index_add_(0, row_of_entry, self.count)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Shapes depend on the data the model was fitted on: take the incoming shapes (on this
        # module's device) before the default loader copies values in place.
        for name, buf in self._buffers.items():
            incoming = state_dict.get(prefix + name)
            if buf is not None and incoming is not None:
                self._buffers[name] = torch.empty(incoming.shape, dtype=incoming.dtype, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def lookup(self, keys: Tensor) -> tuple[Tensor, Tensor]:
        """Row index of each key, and whether the context was seen at all."""
        n = self.ctx_keys.numel()
        if n == 0:
            return torch.zeros_like(keys), torch.zeros_like(keys, dtype=torch.bool)
        pos = torch.searchsorted(self.ctx_keys, keys).clamp_(max=n - 1)
        return pos, self.ctx_keys[pos] == keys


class NGramLM(nn.Module):
    """Interpolated Kneser-Ney n-gram model; implements models.lm.LanguageModel."""

    def __init__(self, config: NGramConfig):
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.context_length: int | None = None  # conditions on the last n-1 tokens, any length
        self.tables = nn.ModuleList(CountTable() for _ in range(config.order))  # tables[k-1]: order k

    # ---- building ---------------------------------------------------------------------------

    @classmethod
    def from_state_dict(cls, config: NGramConfig | dict, state_dict: dict[str, Tensor]) -> NGramLM:
        """Rebuild a fitted model from its config (or the config's dict) and state_dict."""
        model = cls(config if isinstance(config, NGramConfig) else NGramConfig(**config))
        model.load_state_dict(state_dict)
        return model

    @classmethod
    def fit(cls, tokens: Tensor, config: NGramConfig) -> NGramLM:
        """Count every order on a 1-D token stream (no learning, only counting).

        Vectorised, one pass over the stream per order: k-grams are numbered by one unique over
        keys (id of the k-gram's (k-1)-token prefix) * V + last token, which stay below N * V
        whatever the order. Ids are ranks of sorted keys, hence lexicographic, so the entries come
        out grouped by context. The continuation counts of order k are read off the unique
        (k+1)-grams: each one adds 1 to the k-gram it ends with."""
        if tokens.dim() != 1:
            raise ValueError(f"tokens must be a 1-D stream, got shape {tuple(tokens.shape)}")
        V, n, N = config.vocab_size, config.order, tokens.numel()
        tokens = tokens.to(torch.int64)
        if N and (int(tokens.min()) < 0 or int(tokens.max()) >= V):
            raise ValueError(f"token ids must lie in [0, {V})")
        if N * V >= MAX_KEY:
            raise ValueError("stream too long for 62-bit n-gram keys")
        device = tokens.device
        model = cls(config).to(device)
        prefix_ids = torch.zeros(N, dtype=torch.int64, device=device)  # per position: id of the empty prefix
        prefix_keys = torch.zeros(1, dtype=torch.int64, device=device)  # base-V key of each prefix id
        pending = None  # order k-1, stored once order k gives its continuation counts
        for k in range(1, n + 1):
            m = N - k + 1  # number of k-grams in the stream
            if m <= 0:
                break  # stream shorter than k: this order and the higher ones stay empty
            grams, ids, counts = _unique_with_inverse(prefix_ids[:m] * V + tokens[k - 1 :], prefix_keys.numel() * V)
            prefix_of, last_token = grams // V, grams % V
            if pending is not None:
                # k-gram at position p = (token p, the (k-1)-gram at p+1): any one occurrence of each
                # distinct k-gram names the (k-1)-gram it ends with. A (k-1)-gram seen only at the
                # very start of the stream has nothing before it and gets 0 (dropped).
                prev_table, prev_ids, prev_entries = pending
                occurrence = torch.empty_like(grams).scatter_(0, ids, torch.arange(m, device=device))
                ends_with = prev_ids.index_select(0, occurrence + 1)
                continuation = torch.bincount(ends_with, minlength=prev_entries[0].numel())
                prev_table.store(*prev_entries, continuation)
            entries = (prefix_keys.index_select(0, prefix_of), last_token)
            if k == n:
                model.tables[k - 1].store(*entries, counts)  # the highest order keeps raw counts
            else:
                pending = (model.tables[k - 1], ids, entries)
                # The k-grams are the next order's contexts (keys < V^(n-1), checked in the config).
                prefix_ids, prefix_keys = ids, entries[0] * V + last_token
        return model

    def n_ngrams(self) -> list[int]:
        """Number of stored entries per order (1..n), for reports."""
        return [t.count.numel() for t in self.tables]

    # ---- probabilities ----------------------------------------------------------------------

    def _next_probs(self, history: Tensor, lengths: Tensor) -> Tensor:
        """(N, n-1) right-aligned contexts with (N,) real lengths (<= n-1) -> (N, V) float64 probs.

        Builds the interpolation bottom-up: start uniform, then at each order k whose context the
        row has (length >= k-1) and which was seen, p <- discounted counts / total + backoff * p."""
        V, D = self.vocab_size, self.config.discount
        rows_n = history.shape[0]
        probs = torch.full((rows_n, V), 1.0 / V, dtype=torch.float64, device=history.device)
        keys = torch.zeros(rows_n, dtype=torch.int64, device=history.device)
        for k, table in enumerate(self.tables, start=1):
            m = k - 1  # context length of this order
            if m > 0:  # prepend the next older token: key_m = h[-m] * V^(m-1) + key_{m-1}
                keys = keys + history[:, -m] * V ** (m - 1)
            pos, found = table.lookup(keys)
            found &= lengths >= m  # shorter history: this order is skipped, the lower one stands
            rows = found.nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            ctx = pos[rows]
            start, types = table.row_ptr[ctx], table.row_ptr[ctx + 1] - table.row_ptr[ctx]
            total = table.ctx_total[ctx].to(torch.float64)
            weight = torch.ones(rows_n, dtype=torch.float64, device=history.device)
            weight[rows] = D * types.to(torch.float64) / total  # mass freed by discounting, for the lower order
            probs *= weight[:, None]
            # Gather each row's CSR range: entry j of row r is start[r] + j.
            n_entries = int(types.sum())
            row_ids = torch.arange(rows.numel(), device=rows.device)
            entry_row = torch.repeat_interleave(row_ids, types, output_size=n_entries)
            first = torch.cumsum(types, 0) - types
            entry = torch.arange(n_entries, device=rows.device) + (start - first)[entry_row]
            counts = table.count[entry].to(torch.float64)
            # (row, token) pairs are distinct within a row, so a plain indexed add is exact.
            probs[rows[entry_row], table.next_token[entry]] += (counts - D).clamp_(min=0) / total[entry_row]
        return probs

    def _log_probs(self, history: Tensor, lengths: Tensor) -> Tensor:
        # Chunk rows so the dense (rows, V) float64 working set stays around 32 MB.
        chunk = max(1, (1 << 22) // self.vocab_size)
        out = [
            self._next_probs(history[i : i + chunk], lengths[i : i + chunk]).log_().float()
            for i in range(0, history.shape[0], chunk)
        ]
        return torch.cat(out) if out else torch.zeros(0, self.vocab_size, device=history.device)

    def logits(self, tokens: Tensor) -> Tensor:
        """(B, T) -> (B, T, V) log-probabilities (valid logits: log_softmax leaves them unchanged).

        Position t conditions on tokens max(0, t-n+2)..t. Near the start of a sequence, with fewer
        than n-1 tokens, it uses the order that fits the available context (its KN distribution
        directly, continuation counts included) rather than padding with a token that was never
        part of the training stream."""
        B, T = tokens.shape
        ctx = self.config.order - 1
        if ctx > 0:
            # Window t covers padded positions t..t+ctx-1, i.e. tokens t-ctx+1..t.
            history = F.pad(tokens.to(torch.int64), (ctx - 1, 0)).unfold(1, ctx, 1).reshape(B * T, ctx)
        else:
            history = tokens.new_zeros(B * T, 0, dtype=torch.int64)
        lengths = (torch.arange(T, device=tokens.device) + 1).clamp(max=ctx).repeat(B)
        return self._log_probs(history, lengths).view(B, T, self.vocab_size)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.logits(tokens)

    # ---- decoding state ---------------------------------------------------------------------

    def allocate(self, slots: int, max_len: int) -> NGramState:
        # Only the last n-1 tokens matter, so max_len does not size anything.
        device = self.tables[0].count.device
        return NGramState(
            history=torch.zeros(slots, self.config.order - 1, dtype=torch.int64, device=device),
            lengths=torch.zeros(slots, dtype=torch.int64, device=device),
        )

    def prefill(self, state: NGramState, slots: Tensor, tokens: Tensor, lengths: Tensor) -> Tensor:
        ctx = self.config.order - 1
        lengths = lengths.to(device=tokens.device, dtype=torch.int64)
        # Right-align the last ctx real tokens of each row; columns before the prompt start are 0.
        idx = lengths[:, None] - ctx + torch.arange(ctx, device=tokens.device)
        history = tokens.to(torch.int64).gather(1, idx.clamp(min=0)) * (idx >= 0)
        state.history[slots] = history
        state.lengths[slots] = lengths
        return self._log_probs(history, lengths.clamp(max=ctx))

    def decode(self, state: NGramState, slots: Tensor, tokens: Tensor) -> Tensor:
        ctx = self.config.order - 1
        history = state.history[slots]
        if ctx > 0:
            history = torch.cat([history[:, 1:], tokens.to(torch.int64)[:, None]], dim=1)
        lengths = state.lengths[slots] + 1
        log_probs = self._log_probs(history, lengths.clamp(max=ctx))
        # The state changes only once the step has succeeded: a failed step can be rerun (service/decoding.py).
        if ctx > 0:
            state.history[slots] = history
        state.lengths[slots] = lengths
        return log_probs

    def copy_slots(self, state: NGramState, src: Tensor, dst: Tensor) -> None:
        # The right-hand side is gathered before the write, so overlapping src/dst is safe.
        state.history[dst] = state.history[src]
        state.lengths[dst] = state.lengths[src]


def _unique_with_inverse(keys: Tensor, key_range: int) -> tuple[Tensor, Tensor, Tensor]:
    """torch.unique(keys, return_inverse=True, return_counts=True) for keys in [0, key_range).

    When the range is small against the stream (small vocabularies, low orders), a bincount and a
    lookup table replace the sort, which dominates the counting time."""
    if key_range > max(4 * keys.numel(), 1 << 16):
        return torch.unique(keys, return_inverse=True, return_counts=True)
    counts = torch.bincount(keys, minlength=key_range)
    grams = counts.nonzero().squeeze(1)
    rank = torch.empty(key_range, dtype=torch.int64, device=keys.device)  # only read where keys occur
    rank.index_copy_(0, grams, torch.arange(grams.numel(), device=keys.device))
    # index_select: several times faster than advanced indexing for large gathers on CPU.
    return grams, rank.index_select(0, keys), counts.index_select(0, grams)
