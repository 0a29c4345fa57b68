"""CharLSTM: the decoding-state protocol against full recomputation, learning, and the safetensors
round trip."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load, save

from genserve.models.lm import LanguageModel
from genserve.models.lstm import CharLSTM, LSTMConfig

VOCAB = 11


@pytest.fixture(autouse=True)
def one_thread():
    """The tensors here are tiny: intra-op threads only add overhead, and on a busy machine their
    spinning makes these tests many times slower (tens of seconds on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def model() -> CharLSTM:
    torch.manual_seed(0)
    return CharLSTM(LSTMConfig(vocab_size=VOCAB, n_embd=8, hidden_size=16, n_layer=2)).eval()


def assert_matches_recomputation(model: CharLSTM, out: torch.Tensor, seqs: list[list[int]]) -> None:
    with torch.no_grad():
        for row, seq in zip(out, seqs, strict=True):
            want = torch.log_softmax(model.logits(torch.tensor([seq]))[0, -1], -1)
            torch.testing.assert_close(torch.log_softmax(row, -1), want, atol=1e-5, rtol=0)


def test_conforms_to_protocol(model: CharLSTM):
    assert isinstance(model, LanguageModel)
    assert model.vocab_size == VOCAB and model.context_length is None
    logits, loss = model(torch.zeros(2, 5, dtype=torch.long))
    assert logits.shape == (2, 5, VOCAB) and loss is None


def test_prefill_and_decode_match_full_recomputation(model: CharLSTM):
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([3, 7, 1, 5])
    prompts = torch.randint(0, VOCAB, (4, 7), generator=gen)
    prompts[torch.arange(7) >= lengths[:, None]] = -1  # padding is never read
    slots = torch.tensor([5, 1, 3, 8])
    state = model.allocate(10, max_len=32)
    seqs = [prompts[b, : lengths[b]].tolist() for b in range(4)]
    assert_matches_recomputation(model, model.prefill(state, slots, prompts, lengths), seqs)
    for step in range(6):
        # Alternate all slots with a subset in another order: slots are independent.
        rows = [0, 1, 2, 3] if step % 2 == 0 else [3, 0]
        tokens = torch.randint(0, VOCAB, (len(rows),), generator=gen)
        for r, tok in zip(rows, tokens.tolist(), strict=True):
            seqs[r].append(tok)
        assert_matches_recomputation(model, model.decode(state, slots[rows], tokens), [seqs[r] for r in rows])


def test_copy_slots_forks_and_reorders(model: CharLSTM):
    state = model.allocate(8, max_len=32)
    prompt = [4, 2, 7, 1]
    model.prefill(state, torch.tensor([2]), torch.tensor([prompt]), torch.tensor([4]))
    model.copy_slots(state, torch.tensor([2, 2, 2]), torch.tensor([0, 5, 6]))
    forks = torch.tensor([0, 5, 6])
    seqs = [list(prompt) for _ in range(3)]
    for tokens in ([1, 2, 3], [0, 8, 3], [5, 5, 6]):
        for seq, tok in zip(seqs, tokens, strict=True):
            seq.append(tok)
        assert_matches_recomputation(model, model.decode(state, forks, torch.tensor(tokens)), seqs)
    # Beam reordering: swap two slots in one call.
    model.copy_slots(state, torch.tensor([0, 5]), torch.tensor([5, 0]))
    seqs[0], seqs[1] = seqs[1], seqs[0]
    for seq in seqs:
        seq.append(3)
    assert_matches_recomputation(model, model.decode(state, forks, torch.tensor([3, 3, 3])), seqs)


def test_state_follows_module_dtype(model: CharLSTM):
    state = model.double().allocate(3, max_len=8)
    assert state.h.dtype == state.c.dtype == torch.float64 and state.h.shape == (2, 3, 16)
    out = model.prefill(state, torch.tensor([1]), torch.tensor([[1, 2]]), torch.tensor([2]))
    assert out.dtype == torch.float64


def test_learns_a_periodic_sequence():
    # Period 0 1 0 2 0 3: what follows a 0 depends on the token before it, so it needs memory.
    torch.manual_seed(0)
    seq = torch.tensor([0, 1, 0, 2, 0, 3] * 9)[None]
    model = CharLSTM(LSTMConfig(vocab_size=4, n_embd=8, hidden_size=32, n_layer=1))
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(250):
        _, loss = model(seq[:, :-1], seq[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_safetensors_round_trip(model: CharLSTM):
    blob = save(model.state_dict())
    config_dict = json.loads(json.dumps(model.config.to_dict()))  # the manifest stores it as JSON
    rebuilt = CharLSTM.from_state_dict(config_dict, load(blob)).eval()
    tokens = torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(rebuilt.logits(tokens), model.logits(tokens))
