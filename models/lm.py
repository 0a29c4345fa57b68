"""What a language model offers the decoding loop: a full forward, and steps on a decoding state.

A decoding *state* holds, for each of a fixed number of *slots*, what the model remembers about
one sequence: the KV cache for the transformer, the hidden state for the LSTM, the last n-1
tokens for the n-gram model. The decoding loop (service/decoding.py) only ever sees this
interface, so greedy, sampling and beam search work on every model the same way:

- `allocate(slots, max_len)` makes an empty state once (preallocated, never grown);
- `prefill(state, slots, tokens, lengths)` reads whole prompts into the given slots, one forward
  pass for all of them, and returns the logits after each prompt's last token;
- `decode(state, slots, tokens)` appends one token to each given slot and returns the logits
  for the next; every running sequence of every request goes through one call per step;
- `copy_slots(state, src, dst)` copies slot contents, so a prompt read once can be forked into
  n samples or k beams, and beams can be reordered after each step.

Logits are raw scores (B, vocab); the loop applies log_softmax, temperature and filters.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor


@runtime_checkable
class LanguageModel(Protocol):
    vocab_size: int
    # The longest sequence (prompt + generated) the model can condition on; None: no limit of
    # its own (the state's max_len still bounds it).
    context_length: int | None

    def logits(self, tokens: Tensor) -> Tensor:
        """(B, T) token ids -> (B, T, vocab) logits, position t predicting token t+1."""
        ...

    def allocate(self, slots: int, max_len: int) -> Any:
        """An empty decoding state for `slots` sequences of up to `max_len` tokens each."""
        ...

    def prefill(self, state: Any, slots: Tensor, tokens: Tensor, lengths: Tensor) -> Tensor:
        """Read prompts into slots. tokens (B, T) right-padded, lengths (B,) >= 1 the real lengths;
        returns (B, vocab) logits after token lengths[b]-1 of each row. Overwrites the slots."""
        ...

    def decode(self, state: Any, slots: Tensor, tokens: Tensor) -> Tensor:
        """Append tokens (B,) to slots (B,) (distinct); returns (B, vocab) next-token logits."""
        ...

    def copy_slots(self, state: Any, src: Tensor, dst: Tensor) -> None:
        """state[dst[i]] = state[src[i]] for all i at once (src may repeat; dst distinct)."""
        ...


def next_token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean cross-entropy of (B, T, V) logits against (B, T) targets; targets of -1 (padding) are ignored."""
    return torch.nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


def sequence_log_probs(model: LanguageModel, tokens: Tensor) -> Tensor:
    """log p(token t | tokens < t) for t = 1..T-1 of each row: (B, T-1). The first token is the
    context (a BOS token when scoring a whole text)."""
    logits = model.logits(tokens[:, :-1]).float()
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)


def right_padded(token_lists: list[list[int]], width: int) -> Tensor:
    """(len(token_lists), width) int64: each list at the start of its row, zeros after."""
    tokens = torch.zeros(len(token_lists), width, dtype=torch.long)
    for i, t in enumerate(token_lists):
        tokens[i, : len(t)] = torch.tensor(t)
    return tokens


def mean_hidden_states(model: torch.nn.Module, token_lists: list[list[int]], rows: int = 64) -> Tensor:
    """(N, D) float64: each list's final hidden states (`model.hidden_states`, GPT and LSTM) averaged over the
    positions after its first token (the context, BOS for a whole text): what the model made of the text, as one
    vector. A one-token list gives the state at its only position."""
    if not token_lists:
        return torch.zeros(0, 0, dtype=torch.float64)
    device = next(iter(model.parameters())).device
    out = []
    for start in range(0, len(token_lists), rows):
        chunk = token_lists[start : start + rows]
        tokens = right_padded(chunk, max(len(t) for t in chunk))
        mask = torch.zeros(tokens.shape, dtype=torch.float64)
        for i, t in enumerate(chunk):
            mask[i, 1 if len(t) > 1 else 0 : len(t)] = 1.0
        # Right padding is harmless here as in scoring: causal models, padded positions masked out of the mean.
        hidden = model.hidden_states(tokens.to(device)).double().cpu()
        out.append((hidden * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True))
    return torch.cat(out)


def score_token_lists(model: LanguageModel, token_lists: list[list[int]], budget_bytes: int = 256 << 20
                      ) -> list[list[float]]:
    """log p(token t | tokens < t) for t >= 1 of each list (the first token is the context, BOS for a whole
    text), padded into rows of one forward pass per chunk; chunks keep the (rows, width, vocab) float32 logits
    near `budget_bytes` however many long lists there are."""
    if not token_lists:
        return []
    tensors = [*model.parameters(), *model.buffers()][:1] if isinstance(model, torch.nn.Module) else []
    device = tensors[0].device if tensors else torch.device("cpu")
    width = max(len(t) for t in token_lists)
    rows = max(1, budget_bytes // (width * model.vocab_size * 4))
    results = []
    for start in range(0, len(token_lists), rows):
        chunk = token_lists[start : start + rows]
        tokens = right_padded(chunk, width)
        # Right padding is harmless: every model here is causal, padding only follows real tokens.
        log_probs = sequence_log_probs(model, tokens.to(device)).double().cpu()
        results += [log_probs[i, : len(t) - 1].tolist() for i, t in enumerate(chunk)]
    return results
