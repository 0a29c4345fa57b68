"""A tiny GPT fitted for a moment to a shuffled text, shared by the decoding tests (tests/service/test_decoding.py)
and the device tests (tests/test_devices.py): greedy output varies (an untrained tied-embedding model mostly
repeats its last token) while sampling still has real choices. Imports neither Ray nor FastAPI."""

from __future__ import annotations

import torch

from genserve.artifacts.tokenizer import TextTokenizer
from genserve.models.gpt import GPT, GPTConfig

TEXT = "abcdefgh ijk\nlmnop"


def fit_tiny_gpt(tokenizer: TextTokenizer, text: str = TEXT) -> GPT:
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=64, n_layer=2, n_head=2, n_embd=32))
    order = torch.randperm(len(text) * 3) % len(text)
    data = torch.tensor(tokenizer.encode("".join(text[i] for i in order.tolist())))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for _ in range(60):
        _, loss = m(data[None, :-1][:, :48], data[None, 1:][:, :48])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return m.eval()
