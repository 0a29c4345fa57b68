"""The decoding loop on tiny random models: greedy, sampling, beam search, stop conditions, and
continuous batching (requests joining and leaving a running batch)."""

import itertools
import math

import pytest
import torch

from genserve.artifacts.tokenizer import TextTokenizer, train_char_tokenizer
from genserve.models.gpt import GPT, GPTConfig
from genserve.service.decoding import Engine, GenerationParams, filter_logits, generate
from tests.tiny_lm import TEXT, fit_tiny_gpt


@pytest.fixture(scope="module")
def tokenizer():
    return train_char_tokenizer([TEXT])


@pytest.fixture(scope="module")
def model(tokenizer):
    """A tiny GPT fitted for a moment to a shuffled text, so greedy output varies (an untrained tied-embedding
    model mostly repeats its last token) while sampling still has real choices."""
    return fit_tiny_gpt(tokenizer, TEXT)


def naive_greedy(model, prompt, steps):
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(steps):
            tokens.append(int(model.logits(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


def run_all(engine, requests):
    while any(not r.finished for r in requests):
        engine.step()
    return [r.outputs for r in requests]


def test_greedy_equals_recomputing_the_prefix(model, tokenizer):
    prompt = tokenizer.encode("abc d")
    out = generate(model, tokenizer, prompt, GenerationParams(max_new_tokens=12, temperature=0, ignore_eos=True))
    assert out[0].token_ids == naive_greedy(model, prompt, 12)
    assert out[0].finish_reason == "length"
    assert out[0].text == tokenizer.decode(out[0].token_ids)
    with torch.no_grad():
        full = torch.log_softmax(model.logits(torch.tensor([prompt + out[0].token_ids[:-1]]))[0], -1)
    expected = [float(full[len(prompt) - 1 + i, t]) for i, t in enumerate(out[0].token_ids)]
    assert out[0].logprobs == pytest.approx(expected, abs=1e-4)


def test_seeded_sampling_is_reproducible_and_n_samples_differ(model, tokenizer):
    prompt = tokenizer.encode("ab")
    params = GenerationParams(max_new_tokens=20, temperature=1.5, seed=7, n=3, ignore_eos=True)
    first = generate(model, tokenizer, prompt, params)
    again = generate(model, tokenizer, prompt, params)
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    assert len({tuple(o.token_ids) for o in first}) > 1
    other = generate(model, tokenizer, prompt, GenerationParams(max_new_tokens=20, temperature=1.5, seed=8, n=3,
                                                                 ignore_eos=True))
    assert [o.token_ids for o in other] != [o.token_ids for o in first]


def test_the_prompt_is_read_once_for_all_samples_and_beams(model, tokenizer):
    calls = {"prefill": 0, "rows": 0}
    real = model.prefill

    def counting(state, slots, tokens, lengths):
        calls["prefill"] += 1
        calls["rows"] += len(slots)
        return real(state, slots, tokens, lengths)

    model.prefill = counting
    try:
        generate(model, tokenizer, tokenizer.encode("abcdef"), GenerationParams(max_new_tokens=5, n=4, seed=1))
        generate(model, tokenizer, tokenizer.encode("abcdef"), GenerationParams(max_new_tokens=5, num_beams=4))
    finally:
        del model.prefill
    assert calls == {"prefill": 2, "rows": 2}


def test_batched_requests_equal_requests_alone_and_can_join_mid_run(model, tokenizer):
    specs = [
        ("abc", GenerationParams(max_new_tokens=15, temperature=0, ignore_eos=True)),
        ("hij k", GenerationParams(max_new_tokens=9, temperature=0.9, top_k=5, seed=3, n=2, ignore_eos=True)),
        ("l", GenerationParams(max_new_tokens=7, num_beams=3, num_return_sequences=2, ignore_eos=True)),
        ("mnop a", GenerationParams(max_new_tokens=12, temperature=1.0, top_p=0.8, seed=4, ignore_eos=True)),
    ]
    alone = [[o.token_ids for o in generate(model, tokenizer, tokenizer.encode(p), s)] for p, s in specs]
    engine = Engine(model, tokenizer, slots=16, max_len=64)
    first = [engine.submit(tokenizer.encode(p), s) for p, s in specs[:2]]
    for _ in range(4):
        engine.step()
    later = [engine.submit(tokenizer.encode(p), s) for p, s in specs[2:]]  # join a running batch
    together = run_all(engine, first + later)
    assert [[o.token_ids for o in outs] for outs in together] == alone
    assert not engine.has_work and len(engine.free) == 16


def test_requests_wait_for_free_slots_first_come_first_served(model, tokenizer):
    engine = Engine(model, tokenizer, slots=3, max_len=64)
    a = engine.submit(tokenizer.encode("ab"), GenerationParams(max_new_tokens=5, n=2, temperature=0))
    b = engine.submit(tokenizer.encode("cd"), GenerationParams(max_new_tokens=5, n=2, temperature=0))
    c = engine.submit(tokenizer.encode("ef"), GenerationParams(max_new_tokens=5, temperature=0))
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 2  # c does not overtake b
    run_all(engine, [a, b, c])
    assert all(len(o.token_ids) == 5 for r in (a, b, c) for o in r.outputs)


def test_eos_and_ignore_eos(model, tokenizer):
    prompt = tokenizer.encode("abc")
    greedy = naive_greedy(model, prompt, 6)
    # Make the 3rd greedy token the end of text: generation stops there, without its text.
    eos_tok = greedy[2]
    tok = TextTokenizer(tokenizer.tokenizer, "char", tokenizer.bos_token_id, eos_tok)
    out = generate(model, tok, prompt, GenerationParams(max_new_tokens=6, temperature=0))[0]
    first = greedy.index(eos_tok)
    assert out.token_ids == greedy[: first + 1] and out.finish_reason == "stop"
    assert out.text == tokenizer.decode(greedy[:first])
    out = generate(model, tok, prompt, GenerationParams(max_new_tokens=6, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == greedy and out.finish_reason == "length"


def test_stop_strings_cut_the_text_and_are_never_streamed(model, tokenizer):
    prompt = tokenizer.encode("ab")
    free = generate(model, tokenizer, prompt, GenerationParams(max_new_tokens=30, temperature=0, ignore_eos=True))[0]
    stop = free.text[5:7]
    cut = free.text.find(stop)
    streamed = []
    engine = Engine(model, tokenizer, slots=2, max_len=64)
    params = GenerationParams(max_new_tokens=30, temperature=0, ignore_eos=True, stop=("zzz-never", stop))
    request = engine.submit(prompt, params, on_update=lambda u: streamed.extend(d.text for d in u.deltas))
    run_all(engine, [request])
    out = request.outputs[0]
    assert out.text == free.text[:cut] and out.finish_reason == "stop" and out.stop_string == stop
    assert "".join(streamed) == out.text
    assert len(out.token_ids) < 30


def test_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(filter_logits(logits, 1.0, 2, None)).tolist() == [[True, False, False, True]]
    probs = torch.softmax(logits, -1)[0].tolist()  # ~[0.09, 0.64, 0.24, 0.03]
    kept = ~torch.isinf(filter_logits(logits, 1.0, None, 0.7))
    assert kept.tolist() == [[False, True, True, False]] and probs[1] < 0.7
    assert (~torch.isinf(filter_logits(logits, 1.0, None, 0.5))).tolist() == [[False, True, False, False]]
    torch.testing.assert_close(filter_logits(logits, 2.0, None, None), logits / 2)


def test_beam_search_with_enough_beams_is_exhaustive(tokenizer):
    """With num_beams >= V^(steps-1) no hypothesis is ever pruned: the best beam is the best sequence."""
    torch.manual_seed(3)
    V, steps = 4, 3
    small_tok = train_char_tokenizer(["abc"])  # 3 characters + the special token = 4
    assert small_tok.vocab_size == V
    m = GPT(GPTConfig(vocab_size=V, context_length=16, n_layer=1, n_head=1, n_embd=8)).eval()
    with torch.no_grad():
        m.wte.weight.mul_(20)
    prompt = [1, 2]
    best = None
    with torch.no_grad():
        for seq in itertools.product(range(V), repeat=steps):
            lp = torch.log_softmax(m.logits(torch.tensor([prompt + list(seq[:-1])]))[0, len(prompt) - 1:], -1)
            total = float(sum(lp[i, t] for i, t in enumerate(seq)))
            best = max(best or (-math.inf, ()), (total, seq))
    params = GenerationParams(max_new_tokens=steps, num_beams=V ** (steps - 1), num_return_sequences=3,
                              ignore_eos=True, length_penalty=0.0)
    outs = generate(m, small_tok, prompt, params)
    assert tuple(outs[0].token_ids) == best[1]
    assert outs[0].score == pytest.approx(best[0], abs=1e-4)
    assert [o.score for o in outs] == sorted((o.score for o in outs), reverse=True)
    for o in outs:
        assert sum(o.logprobs) == pytest.approx(o.score, abs=1e-4)  # length_penalty 0: score = sum


def test_cancel_frees_the_slots(model, tokenizer):
    engine = Engine(model, tokenizer, slots=4, max_len=64)
    r = engine.submit(tokenizer.encode("ab"), GenerationParams(max_new_tokens=40, n=4, seed=0))
    engine.step()
    engine.cancel(r)
    engine.step()
    assert r.finished and all(o.finish_reason == "cancelled" for o in r.sequences and [s.out for s in r.sequences])
    assert len(engine.free) == 4 and not engine.has_work


@pytest.mark.parametrize(
    ("prompt_len", "params", "message"),
    [
        (60, GenerationParams(max_new_tokens=10), "context length of 64"),
        (3, GenerationParams(max_new_tokens=2, n=9), "decoding slots"),
        (3, GenerationParams(max_new_tokens=2, num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (3, GenerationParams(max_new_tokens=2, top_p=0), "top_p"),
        (0, GenerationParams(max_new_tokens=2), "no tokens"),
    ],
)
def test_impossible_requests_are_refused_up_front(model, tokenizer, prompt_len, params, message):
    engine = Engine(model, tokenizer, slots=8, max_len=64)
    with pytest.raises(ValueError, match=message):
        engine.submit([1] * prompt_len, params)
    assert not engine.has_work


@pytest.fixture(scope="module")
def baselines(tokenizer):
    from genserve.models.lstm import CharLSTM, LSTMConfig
    from genserve.models.ngram import NGramConfig, NGramLM

    torch.manual_seed(0)
    stream = torch.tensor(tokenizer.encode(TEXT * 5))
    ngram = NGramLM.fit(stream, NGramConfig(vocab_size=tokenizer.vocab_size, order=3))
    lstm = CharLSTM(LSTMConfig(vocab_size=tokenizer.vocab_size, n_embd=16, hidden_size=32, n_layer=2)).eval()
    return {"ngram": ngram, "lstm": lstm}


@pytest.mark.parametrize("kind", ["ngram", "lstm"])
def test_the_same_loop_decodes_the_baselines(baselines, tokenizer, kind):
    """Greedy, seeded sampling and beams on the n-gram's context and the LSTM's hidden state, batched together."""
    model = baselines[kind]
    prompt = tokenizer.encode("abc d")
    greedy = generate(model, tokenizer, prompt, GenerationParams(max_new_tokens=10, temperature=0, ignore_eos=True))
    assert greedy[0].token_ids == naive_greedy(model, prompt, 10)
    engine = Engine(model, tokenizer, slots=8, max_len=64)
    sampled = engine.submit(prompt, GenerationParams(max_new_tokens=10, seed=3, n=2, ignore_eos=True))
    beams = engine.submit(tokenizer.encode("ij"), GenerationParams(max_new_tokens=6, num_beams=3, ignore_eos=True))
    run_all(engine, [sampled, beams])
    alone = generate(model, tokenizer, prompt, GenerationParams(max_new_tokens=10, seed=3, n=2, ignore_eos=True))
    assert [o.token_ids for o in sampled.outputs] == [o.token_ids for o in alone]
    assert len(beams.outputs[0].token_ids) == 6
