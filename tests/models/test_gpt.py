import pytest
import torch

from genserve.artifacts.artifact import load_module_weights, module_weights
from genserve.models.gpt import GPT, GPTConfig
from genserve.models.lm import LanguageModel, sequence_log_probs

V = 37


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=V, context_length=48, n_layer=3, n_head=4, n_embd=32)).eval()


def test_is_a_language_model(model):
    assert isinstance(model, LanguageModel)
    assert model.lm_head.weight is model.wte.weight


@torch.no_grad()
def test_cached_decoding_matches_recomputation_at_every_step(model):
    """Prompts of different lengths, right-padded, in scattered slots; then 20 decode steps.
    At every step each row's logits equal those of the whole prefix recomputed from scratch."""
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([5, 1, 9])
    tokens = torch.randint(0, V, (3, 9), generator=g)
    slots = torch.tensor([4, 0, 2])
    cache = model.allocate(slots=6, max_len=40)
    logits = model.prefill(cache, slots, tokens, lengths)
    seqs = [tokens[i, : lengths[i]].tolist() for i in range(3)]
    for step in range(21):
        for i, seq in enumerate(seqs):
            expected = model.logits(torch.tensor([seq]))[0, -1]
            torch.testing.assert_close(logits[i], expected, atol=1e-4, rtol=0, msg=f"step {step} row {i}")
        if step == 20:
            break
        nxt = torch.randint(0, V, (3,), generator=g)
        for i in range(3):
            seqs[i].append(int(nxt[i]))
        logits = model.decode(cache, slots, nxt)
    assert cache.lengths[slots].tolist() == [len(s) for s in seqs]


@torch.no_grad()
def test_subsets_of_slots_decode_independently(model):
    """A step over some slots leaves the others untouched (requests join and leave the batch)."""
    cache = model.allocate(slots=3, max_len=20)
    prompt = torch.tensor([[1, 2, 3, 4]])
    for s in range(3):
        model.prefill(cache, torch.tensor([s]), prompt, torch.tensor([4]))
    model.decode(cache, torch.tensor([0, 2]), torch.tensor([7, 8]))
    out = model.decode(cache, torch.tensor([1]), torch.tensor([9]))
    torch.testing.assert_close(out[0], model.logits(torch.tensor([[1, 2, 3, 4, 9]]))[0, -1], atol=1e-4, rtol=0)
    out = model.decode(cache, torch.tensor([2, 0]), torch.tensor([5, 5]))
    torch.testing.assert_close(out[0], model.logits(torch.tensor([[1, 2, 3, 4, 8, 5]]))[0, -1], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1], model.logits(torch.tensor([[1, 2, 3, 4, 7, 5]]))[0, -1], atol=1e-4, rtol=0)


@torch.no_grad()
def test_a_contiguous_block_at_different_positions_decodes_exactly(model):
    """Slots 1 and 2 (a block, read as a view of the cache) hold prompts of different lengths (so a
    mask is needed); slot 0 and 3 hold others that must not leak in."""
    cache = model.allocate(slots=4, max_len=20)
    prompts = {0: [9, 9, 9, 9, 9, 9, 9], 1: [1, 2, 3], 2: [4, 5, 6, 7, 8], 3: [2]}
    for s, p in prompts.items():
        model.prefill(cache, torch.tensor([s]), torch.tensor([p]), torch.tensor([len(p)]))
    out = model.decode(cache, torch.tensor([1, 2]), torch.tensor([10, 11]))
    for row, (s, t) in enumerate(((1, 10), (2, 11))):
        expected = model.logits(torch.tensor([[*prompts[s], t]]))[0, -1]
        torch.testing.assert_close(out[row], expected, atol=1e-4, rtol=0)


@torch.no_grad()
def test_decoding_follows_changed_weights():
    """The output projection's transposed copy (kept for speed on the CPU) is rebuilt when the weight changes."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=V, context_length=16, n_layer=1, n_head=2, n_embd=8)).eval()
    prompt = torch.tensor([[1, 2, 3]])
    for _ in range(2):
        got = m.prefill(m.allocate(1, 8), torch.tensor([0]), prompt, torch.tensor([3]))
        torch.testing.assert_close(got[0], m.logits(prompt)[0, -1], atol=1e-5, rtol=0)
        m.wte.weight.mul_(1.5)  # in place, as an optimizer step would


@torch.no_grad()
def test_copy_slots_forks_and_reorders(model):
    cache = model.allocate(slots=4, max_len=20)
    model.prefill(cache, torch.tensor([0]), torch.tensor([[3, 1, 4, 1, 5]]), torch.tensor([5]))
    model.copy_slots(cache, torch.tensor([0, 0, 0]), torch.tensor([1, 2, 3]))
    model.decode(cache, torch.tensor([0, 1, 2, 3]), torch.tensor([10, 11, 12, 13]))
    # A beam-search reorder: new slot i continues old slot src[i] (overlapping src and dst).
    model.copy_slots(cache, torch.tensor([2, 2, 0, 3]), torch.tensor([0, 1, 2, 3]))
    out = model.decode(cache, torch.tensor([0, 1, 2, 3]), torch.tensor([20, 21, 22, 23]))
    parents = [12, 12, 10, 13]
    for i in range(4):
        expected = model.logits(torch.tensor([[3, 1, 4, 1, 5, parents[i], 20 + i]]))[0, -1]
        torch.testing.assert_close(out[i], expected, atol=1e-4, rtol=0)


@torch.no_grad()
def test_limits_are_enforced(model):
    with pytest.raises(ValueError, match="context length"):
        model.logits(torch.zeros(1, 49, dtype=torch.long))
    with pytest.raises(ValueError, match="context length"):
        model.allocate(slots=1, max_len=49)
    cache = model.allocate(slots=1, max_len=3)
    model.prefill(cache, torch.tensor([0]), torch.tensor([[1, 2, 3]]), torch.tensor([3]))
    with pytest.raises(ValueError, match="cache"):
        model.decode(cache, torch.tensor([0]), torch.tensor([1]))


def test_kv_cache_bytes_per_token(model):
    cache = model.allocate(slots=1, max_len=8)
    c = model.config
    assert cache.bytes_per_token() == 2 * c.n_layer * c.n_embd * 4


@torch.no_grad()
def test_sequence_log_probs_sum_to_the_chain_rule(model):
    tokens = torch.tensor([[0, 5, 6, 7, 8]])
    lp = sequence_log_probs(model, tokens)
    assert lp.shape == (1, 4)
    manual = sum(torch.log_softmax(model.logits(tokens[:, : t + 1])[0, -1], -1)[tokens[0, t + 1]] for t in range(4))
    torch.testing.assert_close(lp.sum(), manual, atol=1e-4, rtol=0)


def test_learns_and_round_trips_through_safetensors():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=8, context_length=16, n_layer=1, n_head=2, n_embd=16)
    model = GPT(config)
    data = torch.arange(64) % 8  # a deterministic cycle: perfectly predictable
    x, y = data[:16][None], data[1:17][None]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        _, loss = model(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05 < first
    model.eval()
    rebuilt = GPT(GPTConfig(**config.to_dict())).eval()
    load_module_weights(rebuilt, module_weights(model))
    torch.testing.assert_close(rebuilt.logits(x), model.logits(x), atol=0, rtol=0)
