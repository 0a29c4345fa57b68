"""Character-level LSTM language model (char-RNN), the recurrent baseline next to the GPT.

embedding -> stacked nn.LSTM -> linear to the vocabulary. Training is teacher forcing on whole
sequences (`forward` with targets, as in nanoGPT). For decoding, the state of a sequence is just
the LSTM's (h, c) after its last token, so a step costs O(1) in the sequence length and the model
has no context limit of its own: `context_length` is None.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from genserve.models.lm import next_token_loss


@dataclass(frozen=True)
class LSTMConfig:
    vocab_size: int
    n_embd: int = 128
    hidden_size: int = 512
    n_layer: int = 2
    dropout: float = 0.0  # on the embeddings, between LSTM layers and before the head (training only)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LSTMState:
    """Decoding state: each slot's hidden and cell state after the last token it has read."""

    h: Tensor  # (n_layer, slots, hidden_size)
    c: Tensor  # (n_layer, slots, hidden_size)


class CharLSTM(nn.Module):
    """Implements models.lm.LanguageModel."""

    def __init__(self, config: LSTMConfig):
        super().__init__()
        self.config = config
        self.vocab_size = config.vocab_size
        self.context_length: int | None = None
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.lstm = nn.LSTM(
            config.n_embd,
            config.hidden_size,
            num_layers=config.n_layer,
            batch_first=True,
            # nn.LSTM's dropout acts between layers only, and warns when there is one layer.
            dropout=config.dropout if config.n_layer > 1 else 0.0,
        )
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)

    @classmethod
    def from_state_dict(cls, config: LSTMConfig | dict, state_dict: dict[str, Tensor]) -> CharLSTM:
        """Rebuild from the config (or its dict) and a state_dict; shapes follow from the config."""
        model = cls(config if isinstance(config, LSTMConfig) else LSTMConfig(**config))
        model.load_state_dict(state_dict)
        return model

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """(B, T) ids -> (B, T, V) logits, and the mean cross-entropy when targets (B, T) are given
        (targets equal to -1 are ignored, e.g. padding)."""
        logits = self.lm_head(self.drop(self.hidden_states(idx)))
        return logits, None if targets is None else next_token_loss(logits, targets)

    def hidden_states(self, idx: Tensor) -> Tensor:
        """(B, T) ids -> (B, T, hidden_size): the top LSTM layer's output at each position, what the head reads
        (the text knn score's features)."""
        out, _ = self.lstm(self.drop(self.wte(idx)))
        return out

    def logits(self, tokens: Tensor) -> Tensor:
        return self(tokens)[0]

    # ---- decoding state ---------------------------------------------------------------------

    def allocate(self, slots: int, max_len: int) -> LSTMState:
        # The state does not grow with the sequence, so max_len does not size anything.
        weight = self.lm_head.weight
        shape = (self.config.n_layer, slots, self.config.hidden_size)
        return LSTMState(
            h=torch.zeros(shape, dtype=weight.dtype, device=weight.device),
            c=torch.zeros(shape, dtype=weight.dtype, device=weight.device),
        )

    @torch.no_grad()
    def prefill(self, state: LSTMState, slots: Tensor, tokens: Tensor, lengths: Tensor) -> Tensor:
        # Packing stops each row after lengths[b] tokens, so the final (h, c) nn.LSTM returns are
        # those after each row's own last token (restored to batch order), never after padding.
        # Padding may hold any id (say -1): zero it so the embedding lookup stays in range.
        padding = torch.arange(tokens.shape[1], device=tokens.device) >= lengths.to(tokens.device)[:, None]
        x = self.wte(tokens.masked_fill(padding, 0))
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, (h, c) = self.lstm(packed)
        state.h[:, slots] = h
        state.c[:, slots] = c
        # The top layer's final hidden state is its output at token lengths[b]-1.
        return self.lm_head(h[-1])

    @torch.no_grad()
    def decode(self, state: LSTMState, slots: Tensor, tokens: Tensor) -> Tensor:
        out, (h, c) = self.lstm(self.wte(tokens)[:, None], (state.h[:, slots], state.c[:, slots]))
        logits = self.lm_head(out[:, 0])
        # Written only once the step has succeeded: a failed step can be rerun (service/decoding.py).
        state.h[:, slots] = h
        state.c[:, slots] = c
        return logits

    @torch.no_grad()
    def copy_slots(self, state: LSTMState, src: Tensor, dst: Tensor) -> None:
        # The right-hand side is gathered before the write, so overlapping src/dst is safe.
        state.h[:, dst] = state.h[:, src]
        state.c[:, dst] = state.c[:, src]
