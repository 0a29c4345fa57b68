"""NGramLM: interpolated Kneser-Ney against hand counts and a brute-force reference, normalisation,
the decoding-state protocol against full recomputation, and the safetensors round trip."""

from __future__ import annotations

import json
import math
import random
from collections import Counter

import pytest
import torch
from safetensors.torch import load, save

from genserve.models.lm import LanguageModel, sequence_log_probs
from genserve.models.ngram import NGramConfig, NGramLM


@pytest.fixture(autouse=True)
def one_thread():
    """The tensors here are tiny: intra-op threads only add overhead, and on a busy machine their
    spinning makes these tests many times slower (tens of seconds on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_stream(n: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (n,), generator=torch.Generator().manual_seed(seed))


def reference_kn(stream: list[int], vocab_size: int, order: int, discount: float):
    """Interpolated KN straight from its definition, with dictionaries; returns p(w, context)."""
    raw = [Counter() for _ in range(order + 1)]  # raw[k]: k-gram -> count
    for k in range(1, order + 1):
        for i in range(len(stream) - k + 1):
            raw[k][tuple(stream[i : i + k])] += 1
    # Row tables per order: context -> {next: count}; raw counts at the top order, continuation
    # counts N1+(. g) (distinct tokens before g) below it.
    rows: list[dict] = [{} for _ in range(order + 1)]
    for k in range(1, order + 1):
        table = raw[k] if k == order else Counter(g[1:] for g in raw[k + 1])
        for g, c in table.items():
            rows[k].setdefault(g[:-1], {})[g[-1]] = c

    def prob(w: int, context: tuple[int, ...]) -> float:
        k = len(context) + 1  # the order that fits the context (shorter at a sequence's start)
        lower = prob(w, context[1:]) if context else 1.0 / vocab_size
        row = rows[k].get(context)
        if not row:
            return lower
        total = sum(row.values())
        return max(row.get(w, 0) - discount, 0) / total + discount * len(row) / total * lower

    return prob


def markov_stream(n: int, vocab_size: int, seed: int) -> list[int]:
    """A second-order Markov chain: each pair of tokens has two likely successors (and noise)."""
    rng = random.Random(seed)
    successors = {(a, b): rng.sample(range(vocab_size), 2) for a in range(vocab_size) for b in range(vocab_size)}
    out = [0, 1]
    for _ in range(n - 2):
        first, second = successors[(out[-2], out[-1])]
        u = rng.random()
        out.append(first if u < 0.7 else second if u < 0.95 else rng.randrange(vocab_size))
    return out


# ---- the smoothing ------------------------------------------------------------------------------


def test_conforms_to_protocol():
    model = NGramLM.fit(random_stream(100, 7), NGramConfig(vocab_size=7, order=3))
    assert isinstance(model, LanguageModel)
    assert model.vocab_size == 7 and model.context_length is None


def test_hand_computed_bigram_values():
    # Stream a b a b c over {a, b, c, d} (ids 0..3), order 2, D = 0.75.
    # Bigram counts: (a,b) 2, (b,a) 1, (b,c) 1. Continuation counts N1+(. w): a 1 (after b),
    # b 1 (after a), c 1 (after b), d 0; 3 in all, 3 distinct types.
    # P1(w) = max(N1+(. w) - D, 0) / 3 + D * 3/3 * 1/4: a, b, c: 0.25/3 + 0.1875; d: 0.1875.
    # P2(b | a) = (2 - D) / 2 + D * 1/2 * P1(b).
    model = NGramLM.fit(torch.tensor([0, 1, 0, 1, 2]), NGramConfig(vocab_size=4, order=2, discount=0.75))
    probs = model.logits(torch.tensor([[0, 3]])).double().exp()[0]
    p1 = [0.25 / 3 + 0.1875] * 3 + [0.1875]
    assert probs[0, 1].item() == pytest.approx(1.25 / 2 + 0.375 * p1[1], abs=1e-6)  # 0.7265625
    assert probs[0, 0].item() == pytest.approx(0.375 * p1[0], abs=1e-6)  # a never followed a
    assert probs[0, 3].item() == pytest.approx(0.375 * p1[3], abs=1e-6)  # d never seen at all
    # Context d was never seen: its distribution is the unigram level's.
    assert probs[1].tolist() == pytest.approx(p1, abs=1e-6)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_matches_brute_force_reference(order: int):
    vocab_size, discount = 5, 0.6
    stream = random_stream(80, vocab_size, seed=order).tolist()
    prob = reference_kn(stream, vocab_size, order, discount)
    model = NGramLM.fit(torch.tensor(stream), NGramConfig(vocab_size, order, discount))
    # Rows from the stream itself (seen contexts) and random ones (unseen contexts too).
    seqs = torch.cat([torch.tensor(stream[:6])[None], random_stream(6 * 6, vocab_size, seed=9).view(6, 6)])
    got = model.logits(seqs).double().exp()
    for b, seq in enumerate(seqs.tolist()):
        for t in range(len(seq)):
            context = tuple(seq[max(0, t - order + 2) : t + 1]) if order > 1 else ()
            want = [prob(w, context) for w in range(vocab_size)]
            assert got[b, t].tolist() == pytest.approx(want, abs=1e-6), (b, t, context)


def test_conditionals_sum_to_one_including_unseen_contexts():
    vocab_size = 50
    model = NGramLM.fit(random_stream(3000, vocab_size), NGramConfig(vocab_size, order=4))
    # With 3000 tokens most 3-token contexts of a random sequence were never seen.
    probs = model.logits(random_stream(8 * 40, vocab_size, seed=1).view(8, 40)).double().exp()
    assert (probs > 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(8, 40, dtype=torch.float64), atol=1e-5, rtol=0)


def test_beats_a_unigram_model_on_held_out_markov_text():
    vocab_size = 12
    stream = torch.tensor(markov_stream(25_000, vocab_size, seed=0))
    train, held_out = stream[:20_000], stream[20_000:]
    nll = {}
    for order in (1, 3):
        model = NGramLM.fit(train, NGramConfig(vocab_size, order))
        nll[order] = -sequence_log_probs(model, held_out[None]).mean().item()
    assert nll[1] > 0.9 * math.log(vocab_size)  # the unigram model barely beats uniform
    assert nll[3] < 0.6 * nll[1]


def test_short_stream_and_bad_input():
    model = NGramLM.fit(torch.tensor([2, 1]), NGramConfig(vocab_size=4, order=5))  # no 3,4,5-grams
    probs = model.logits(torch.tensor([[2, 1, 0, 3, 3, 2]])).double().exp()
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 6, dtype=torch.float64), atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        NGramConfig(vocab_size=5000, order=7)  # 5000^6 > 2^62
    with pytest.raises(ValueError):
        NGramLM.fit(torch.tensor([0, 4]), NGramConfig(vocab_size=4))
    with pytest.raises(ValueError):
        NGramConfig(vocab_size=4, discount=0.0)


# ---- decoding state -----------------------------------------------------------------------------


def assert_matches_recomputation(model: NGramLM, out: torch.Tensor, seqs: list[list[int]]) -> None:
    for row, seq in zip(out, seqs, strict=True):
        want = torch.log_softmax(model.logits(torch.tensor([seq]))[0, -1], -1)
        torch.testing.assert_close(torch.log_softmax(row, -1), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("order", [1, 2, 4])
def test_prefill_and_decode_match_full_recomputation(order: int):
    vocab_size = 9
    model = NGramLM.fit(random_stream(400, vocab_size), NGramConfig(vocab_size, order))
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([3, 7, 1, 5])
    prompts = torch.randint(0, vocab_size, (4, 7), generator=gen)
    prompts[torch.arange(7) >= lengths[:, None]] = -1  # padding is never read
    slots = torch.tensor([5, 1, 3, 8])
    state = model.allocate(10, max_len=32)
    seqs = [prompts[b, : lengths[b]].tolist() for b in range(4)]
    assert_matches_recomputation(model, model.prefill(state, slots, prompts, lengths), seqs)
    for step in range(6):
        # Alternate all slots with a subset in another order: slots are independent.
        rows = [0, 1, 2, 3] if step % 2 == 0 else [3, 0]
        tokens = torch.randint(0, vocab_size, (len(rows),), generator=gen)
        for r, tok in zip(rows, tokens.tolist(), strict=True):
            seqs[r].append(tok)
        out = model.decode(state, slots[rows], tokens)
        assert_matches_recomputation(model, out, [seqs[r] for r in rows])


def test_copy_slots_forks_and_reorders():
    vocab_size = 9
    model = NGramLM.fit(random_stream(400, vocab_size), NGramConfig(vocab_size, order=3))
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


# ---- artifact round trip -------------------------------------------------------------------------


def test_safetensors_round_trip():
    config = NGramConfig(vocab_size=20, order=4, discount=0.7)
    model = NGramLM.fit(random_stream(2000, 20), config)
    blob = save(model.state_dict())
    config_dict = json.loads(json.dumps(config.to_dict()))  # the manifest stores it as JSON
    rebuilt = NGramLM.from_state_dict(config_dict, load(blob))
    plain = NGramLM(NGramConfig(**config_dict))
    plain.load_state_dict(load(blob))  # a plain load_state_dict resizes the tables too
    tokens = random_stream(3 * 12, 20, seed=5).view(3, 12)
    assert torch.equal(rebuilt.logits(tokens), model.logits(tokens))
    assert torch.equal(plain.logits(tokens), model.logits(tokens))
    assert rebuilt.n_ngrams() == model.n_ngrams()


def test_reference_helper_is_normalised():
    # Guards the reference itself: its conditionals sum to 1 too.
    prob = reference_kn([0, 1, 1, 2, 0, 1], 3, 3, 0.75)
    for context in [(), (1,), (0, 1), (2, 2)]:
        assert sum(prob(w, context) for w in range(3)) == pytest.approx(1.0)
