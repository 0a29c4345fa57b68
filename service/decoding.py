"""The decoding loop: greedy, sampling and beam search for many requests at once, on any
`LanguageModel` (models/lm.py): the transformer's KV cache, the LSTM's hidden state or the
n-gram's context all look the same from here.

`Engine` owns one decoding state of `slots` sequences. Each `step()`:
1. admits waiting requests while there are free slots: their prompts are read in ONE batched
   `prefill`, then forked into as many slots as the request has samples or beams (copies, so a
   prompt is processed once and never again);
2. advances every running sequence of every request by one token in ONE batched `decode`;
3. picks each sequence's next token (per request: argmax, a seeded sample, or a beam-search
   step that reorders the request's slots), checks EOS, stop strings and length, frees the slots
   of finished requests for the next arrivals, and reports what changed.

So requests join a running batch between steps (continuous batching) and leave it as soon as they
finish. The engine is synchronous and single-threaded; `submit` and `cancel` may be called from
other threads (the Serve replica's event loop) while a step runs.

A request fails alone: its sampling parameters are normalised so that none the API accepts can make NaN or inf
(`GenerationParams.greedy`, `filter_logits`, `_BeamSearch`), a row of logits that is not a distribution (NaN,
+inf, nothing finite) or a token choice that raises fails that request only, and a batched forward pass that
raises is rerun request by request, so only the requests it fails for get the error (`Request.error`); the
others go on exactly as they would have alone.

Beam search follows Hugging Face `transformers`' `generate()` exactly (its candidate set of
2 x num_beams, the length-normalised score sum_logprobs / generated_len ** length_penalty, its
early-stopping rules), so the same weights and prompt give the same beams token for token.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from genserve.artifacts.tokenizer import TextTokenizer
from genserve.models.lm import LanguageModel
from genserve.service.isolation import LOG_PROB_FLOOR, RequestFailed

log = logging.getLogger("ray.serve")

FinishReason = Literal["stop", "length", "cancelled"]
NEG_INF = -1.0e9  # transformers' "impossible" score, kept for identical beam ranking
DEFAULT_MAX_LEN = 2048  # tokens per sequence for models without a context length of their own (LSTM, n-gram)
# Temperatures below this decode greedily (as vLLM does): sampling that cold is the argmax but for near-ties,
# and far colder divides logits into float32 overflow (1e-45 made inf, then NaN probabilities).
GREEDY_BELOW_TEMPERATURE = 1e-5
# Beam search's length penalty is clamped to +-this: generated_len ** penalty must stay a finite, non-zero float
# for every length a sequence can have (2 ** 1e4 overflows); past it the ranking no longer changes anyway.
LENGTH_PENALTY_LIMIT = 50.0


@dataclass
class GenerationParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW_TEMPERATURE) means greedy
    top_k: int | None = None  # keep the k most likely tokens (None or 0: all)
    top_p: float | None = None  # keep the smallest set with this much probability, at least one (None or 1: all)
    seed: int | None = None  # same seed, same prompt, same params: same text
    stop: tuple[str, ...] = ()  # generation stops before the first occurrence of any of these
    ignore_eos: bool = False
    n: int = 1  # independent samples (or greedy copies) of the same prompt
    num_beams: int = 1  # > 1: beam search (deterministic; temperature, top_k, top_p, seed unused)
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    num_return_sequences: int = 1  # beams returned, best first (<= num_beams)
    top_logprobs: int = 0  # also report this many most likely alternatives per generated token

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE or self.top_k == 1

    @property
    def slots_needed(self) -> int:
        return self.num_beams if self.num_beams > 1 else self.n

    def validate(self) -> None:
        """Internal consistency; the service checks its configured limits before this."""
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0 is greedy)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.n < 1 or self.num_beams < 1:
            raise ValueError("n and num_beams must be at least 1")
        if self.num_beams > 1 and self.n != 1:
            raise ValueError("with beam search use num_return_sequences, not n")
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise ValueError(f"num_return_sequences must be between 1 and num_beams ({self.num_beams})")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")


@dataclass
class SequenceOutput:
    """One generated continuation, final or so far."""

    index: int
    token_ids: list[int] = field(default_factory=list)  # including a final EOS, if one was generated
    logprobs: list[float] = field(default_factory=list)  # log p(token | prefix) under the model, per token
    top_logprobs: list[list[tuple[int, float]]] | None = None
    text: str = ""  # decoded, without EOS, cut before a stop string
    finish_reason: FinishReason | None = None
    stop_string: str | None = None
    score: float | None = None  # beam search: sum of logprobs / generated_len ** length_penalty

    @property
    def cumulative_logprob(self) -> float:
        return float(sum(self.logprobs))


@dataclass
class Delta:
    """What one step added to one sequence (for streaming)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] | None
    finish_reason: FinishReason | None


@dataclass
class Update:
    request: Request
    deltas: list[Delta]
    finished: bool


class _Sequence:
    """A sampled or greedy sequence in a slot, with its text kept incrementally."""

    def __init__(self, index: int, slot: int, tokenizer: TextTokenizer, want_top: bool):
        self.out = SequenceOutput(index=index, top_logprobs=[] if want_top else None)
        self.slot = slot
        self.decoder = tokenizer.incremental_decoder()
        self.emitted = 0  # characters of out.text already reported
        self.pending: int | None = None  # the last chosen token, fed to the model next step

    @property
    def done(self) -> bool:
        return self.out.finish_reason is not None


class Request:
    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], params: GenerationParams, on_update: Callable[[Update], None] | None):
        self.id = next(self._ids)
        self.prompt_ids = prompt_ids
        self.params = params
        self.on_update = on_update
        self.arrived = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.cancelled = False
        self.slots: list[int] = []
        self.sequences: list[_Sequence] = []
        self.beams: _BeamSearch | None = None
        self.generator: torch.Generator | None = None
        self.outputs: list[SequenceOutput] = []  # final results, set when finished
        self.error: str | None = None  # why the request failed (finished with no outputs), if it did

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    @property
    def generated_tokens(self) -> int:
        if self.outputs:
            return sum(len(o.token_ids) for o in self.outputs)
        return sum(len(s.out.token_ids) for s in self.sequences)


# ---- token choice ---------------------------------------------------------------------------


def filter_logits(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None) -> Tensor:
    """Temperature, then top-k, then top-p (nucleus), as transformers applies them: (B, V) -> (B, V)
    with removed tokens at -inf. The most likely token always stays (transformers' min_tokens_to_keep=1), so
    however small top_p is (1e-300 is 0 in float32) a row keeps something to sample."""
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already hold top_p; the first always stays.
        drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
        drop_sorted[:, 0] = False
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_tokens(logits: Tensor, params: GenerationParams, generator: torch.Generator | None) -> Tensor:
    """(B, V) logits -> (B,) next tokens for a sampling or greedy request."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits, params.temperature, params.top_k, params.top_p), dim=-1)
    # Sampled on the CPU with the request's own generator: reproducible whatever the device and
    # whatever else shares the batch.
    return torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(logits.device)


# ---- beam search ----------------------------------------------------------------------------


class _BeamSearch:
    """Beam search state of one request, transformers-compatible (see the module docstring)."""

    def __init__(self, params: GenerationParams, eos: int | None, prompt_len: int):
        self.k = params.num_beams
        self.params = params
        self.length_penalty = max(-LENGTH_PENALTY_LIMIT, min(LENGTH_PENALTY_LIMIT, params.length_penalty))
        self.eos = eos
        self.prompt_len = prompt_len
        self.running_scores = torch.full((self.k,), NEG_INF)
        self.running_scores[0] = 0.0  # the k beams start identical: only one may expand at first
        self.tokens: list[list[int]] = [[] for _ in range(self.k)]
        self.token_logprobs: list[list[float]] = [[] for _ in range(self.k)]
        self.pending: Tensor | None = None  # (k,) tokens to feed next
        self.finished: list[tuple[float, list[int], list[float]]] = []  # (score, tokens, logprobs)
        self.heuristic_unsatisfied = True
        self.generated = 0
        self.done = False

    def step(self, log_probs: Tensor, stop_hit: Callable[[list[int]], bool]) -> Tensor:
        """log_probs (k, V) of the running beams -> parent index (k,) of each new running beam."""
        k, V = log_probs.shape
        p = self.params
        acc = (log_probs.float().cpu() + self.running_scores[:, None]).reshape(-1)
        keep = min(max(2, 1 + (self.eos is not None)) * k, acc.numel())
        top_scores, top_idx = torch.topk(acc, keep)
        parents, tokens = top_idx // V, top_idx % V
        new_len = self.generated + 1
        # A candidate ends here at EOS, at a stop string, or at the length limit (all candidates).
        at_limit = new_len >= p.max_new_tokens
        hits = torch.zeros(keep, dtype=torch.bool)
        for i in range(keep):
            tok = int(tokens[i])
            is_eos = self.eos is not None and tok == self.eos and not p.ignore_eos
            hits[i] = at_limit or is_eos or bool(p.stop and stop_hit([*self.tokens[int(parents[i])], tok]))
        lp_of = [float(top_scores[i] - self.running_scores[parents[i]]) for i in range(keep)]

        # Finished hypotheses: candidates among the first k that hit, scored with the length penalty.
        full = len(self.finished) >= k
        if self.heuristic_unsatisfied and not (full and p.early_stopping is True):
            for i in range(min(k, keep)):
                if hits[i]:
                    b = int(parents[i])
                    score = float(top_scores[i]) / (new_len ** self.length_penalty)
                    self.finished.append((score, [*self.tokens[b], int(tokens[i])],
                                          [*self.token_logprobs[b], lp_of[i]]))
            self.finished.sort(key=lambda h: -h[0])
            del self.finished[k:]

        # The k best candidates that did not finish continue.
        running = top_scores + hits.float() * NEG_INF
        order = torch.topk(running, k).indices
        new_parents = parents[order]
        self.running_scores = running[order]
        self.tokens = [[*self.tokens[int(parents[j])], int(tokens[j])] for j in order.tolist()]
        self.token_logprobs = [[*self.token_logprobs[int(parents[j])], lp_of[j]] for j in order.tolist()]
        self.pending = tokens[order]
        self.generated = new_len

        # transformers' early-stop heuristic: stop when no running beam can beat the worst finished one.
        best_len = p.max_new_tokens if p.early_stopping == "never" and self.length_penalty > 0 else self.generated
        best_possible = float(self.running_scores[0]) / (best_len ** self.length_penalty)
        all_finished = len(self.finished) >= k
        worst = self.finished[-1][0] if all_finished else NEG_INF
        self.heuristic_unsatisfied = self.heuristic_unsatisfied and best_possible > worst
        self.done = (not self.heuristic_unsatisfied or (all_finished and p.early_stopping is True)
                     or bool(hits.all()))
        return new_parents

    def results(self) -> list[tuple[float, list[int], list[float]]]:
        if not self.finished:
            # Stopped before any hypothesis finished: an extreme negative length penalty makes even the best
            # running beam look worse than the "impossible" NEG_INF. The running beams then stand, as
            # transformers' BeamSearchScorer.finalize adds open beams; never an empty answer.
            self.finished = sorted(((float(score) / (self.generated ** self.length_penalty), tokens, lps)
                                    for score, tokens, lps in zip(self.running_scores.tolist(), self.tokens,
                                                                  self.token_logprobs, strict=True)
                                    if score > NEG_INF / 2), key=lambda h: -h[0])
        return self.finished[: self.params.num_return_sequences]


# ---- the engine -----------------------------------------------------------------------------

_Rows = tuple[Request, "list[_Sequence] | None", int]  # see Engine._advance


class Engine:
    def __init__(self, model: LanguageModel, tokenizer: TextTokenizer, slots: int = 16, max_len: int | None = None):
        """`max_len`: most tokens (prompt + generated) a sequence may hold; at most the model's
        context length."""
        bounds = [x for x in (max_len, model.context_length) if x is not None]
        self.max_len = min(bounds) if bounds else DEFAULT_MAX_LEN
        self.model = model
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        self.state = model.allocate(slots, self.max_len)
        self.free = collections.deque(range(slots))
        self.n_slots = slots
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self._lock = threading.Lock()
        param = next(iter(getattr(model, "parameters", lambda: iter(()))()), None)
        self.device = param.device if param is not None else torch.device("cpu")

    # ---- called from any thread ----

    def check(self, prompt_ids: list[int], params: GenerationParams) -> None:
        """Raise ValueError if the request can never run here."""
        params.validate()
        if not prompt_ids:
            raise ValueError("the prompt has no tokens")
        if any(not 0 <= t < self.model.vocab_size for t in prompt_ids):
            raise ValueError(f"token ids must be in [0, {self.model.vocab_size})")
        total = len(prompt_ids) + params.max_new_tokens
        if total > self.max_len:
            raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = "
                             f"{total} exceeds the context length of {self.max_len} tokens")
        if params.slots_needed > self.n_slots:
            raise ValueError(f"{params.slots_needed} sequences at once exceed the {self.n_slots} decoding slots")

    def submit(self, prompt_ids: list[int], params: GenerationParams,
               on_update: Callable[[Update], None] | None = None) -> Request:
        self.check(prompt_ids, params)
        request = Request(list(prompt_ids), params, on_update)
        with self._lock:
            self.waiting.append(request)
        return request

    def cancel(self, request: Request) -> None:
        request.cancelled = True  # picked up at the next step

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ---- the step ----

    @torch.inference_mode()
    def step(self) -> list[Update]:
        updates: list[Update] = []
        self._drop_cancelled(updates)
        stepping = [r for r in self.running if not r.finished]
        admitted = self._admit()
        if admitted:
            self._prefill(admitted, updates)
        if stepping:
            self._decode(stepping, updates)
        for request in [*admitted, *stepping]:
            if request.finished:
                self._release(request)
        for update in updates:
            if update.request.on_update is not None:
                update.request.on_update(update)
        return updates

    def _drop_cancelled(self, updates: list[Update]) -> None:
        with self._lock:
            for request in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(request)
        for request in [r for r in self.running if r.cancelled]:
            for seq in request.sequences:
                if not seq.done:
                    seq.out.finish_reason = "cancelled"
            request.finished_at = time.perf_counter()
            self._release(request)

    def _admit(self) -> list[Request]:
        admitted = []
        with self._lock:
            # First come, first served: a large request at the head waits for slots rather than
            # being overtaken forever by small ones.
            while self.waiting and self.waiting[0].params.slots_needed <= len(self.free):
                request = self.waiting.popleft()
                request.slots = [self.free.popleft() for _ in range(request.params.slots_needed)]
                admitted.append(request)
        self.running.extend(admitted)
        return admitted

    def _release(self, request: Request) -> None:
        if request in self.running:
            self.running.remove(request)
            self.free.extend(request.slots)

    # ---- failing one request alone ----

    def _fail(self, request: Request, error: str, updates: list[Update]) -> None:
        """Finish `request` with `error` and no outputs (its slots are freed at the end of the step)."""
        log.warning("generation request %d failed alone: %s", request.id, error)
        request.error = error
        request.outputs = []
        request.finished_at = time.perf_counter()
        updates[:] = [u for u in updates if u.request is not request]
        updates.append(Update(request, [], True))

    def _isolate(self, requests: list[Request], error: Exception, updates: list[Update],
                 run: Callable[[list[Request], list[Update]], None]) -> None:
        """A batched forward pass raised: run each request's part alone, so only the requests it fails for get
        the error. Sound because every model writes a slot's state only once its step has succeeded (a rerun
        repeats the step, it does not advance twice)."""
        if len(requests) == 1:
            self._fail(requests[0], f"the model failed on this request: {type(error).__name__}: {error}", updates)
            return
        for request in requests:
            run([request], updates)

    # ---- the forward passes ----

    def _prefill(self, requests: list[Request], updates: list[Update]) -> None:
        try:
            logits = self._prefill_forward(requests)
        except Exception as e:
            self._isolate(requests, e, updates, self._prefill)
            return
        now = time.perf_counter()
        rows: list[_Rows] = []
        for r in requests:
            r.first_token_at = now
            p = r.params
            if p.num_beams > 1:
                r.beams = _BeamSearch(p, self.eos, len(r.prompt_ids))
                rows.append((r, None, p.num_beams))
            else:
                if not p.greedy:
                    r.generator = torch.Generator()
                    r.generator.manual_seed(p.seed) if p.seed is not None else r.generator.seed()
                r.sequences = [_Sequence(j, slot, self.tokenizer, p.top_logprobs > 0) for j, slot in enumerate(r.slots)]
                rows.append((r, r.sequences, p.n))
        # Every sequence of a request starts from its prompt's logits: one row per sequence.
        index = torch.tensor([i for i, (_, _, n) in enumerate(rows) for _ in range(n)], device=logits.device)
        self._advance(logits[index], rows, updates)

    def _prefill_forward(self, requests: list[Request]) -> Tensor:
        """Read the prompts into each request's first slot in one pass, fork them into its other slots, and
        return the logits after each prompt (len(requests), V)."""
        lengths = torch.tensor([len(r.prompt_ids) for r in requests], device=self.device)
        tokens = torch.zeros(len(requests), int(lengths.max()), dtype=torch.long, device=self.device)
        for i, r in enumerate(requests):
            tokens[i, : len(r.prompt_ids)] = torch.tensor(r.prompt_ids)
        first_slots = torch.tensor([r.slots[0] for r in requests], device=self.device)
        logits = self.model.prefill(self.state, first_slots, tokens, lengths)
        src, dst = [], []
        for r in requests:
            src += [r.slots[0]] * (len(r.slots) - 1)
            dst += r.slots[1:]
        if dst:
            self.model.copy_slots(self.state, torch.tensor(src, device=self.device),
                                  torch.tensor(dst, device=self.device))
        return logits

    def _decode(self, requests: list[Request], updates: list[Update]) -> None:
        slots, tokens, rows = [], [], []
        for r in requests:
            if r.beams is not None:
                slots += r.slots
                tokens += r.beams.pending.tolist()
                rows.append((r, None, len(r.slots)))
            else:
                live = [s for s in r.sequences if not s.done]
                slots += [s.slot for s in live]
                tokens += [s.pending for s in live]
                rows.append((r, live, len(live)))
        try:
            logits = self.model.decode(self.state, torch.tensor(slots, device=self.device),
                                       torch.tensor(tokens, device=self.device))
        except Exception as e:
            self._isolate(requests, e, updates, self._decode)
            return
        self._advance(logits, rows, updates)

    # ---- choosing tokens ----

    def _advance(self, logits: Tensor, rows: list[_Rows], updates: list[Update]) -> None:
        """Choose the next token of every row, in order: (request, its live sequences or None for
        beam search, number of rows). The softmax, the greedy argmax and the chosen tokens'
        log-probabilities are computed once for the whole batch, not once per request: with many
        small requests, per-request tensor operations would cost more than the model step.
        A request whose rows are not distributions, or whose token choice fails, fails alone."""
        logits = logits.float()
        log_probs = torch.log_softmax(logits, dim=-1)
        chosen = logits.argmax(dim=-1)
        # NaN or +inf logits make a row NaN; a row of only -inf has nothing to choose.
        broken = (torch.isnan(log_probs).any(dim=-1) | ~torch.isfinite(log_probs).any(dim=-1)).tolist()
        live: list[tuple[Request, list[_Sequence] | None, slice]] = []
        at = 0
        for r, seqs, n in rows:
            span, at = slice(at, at + n), at + n
            if any(broken[span]):
                self._fail(r, "numerical failure: the model's next-token scores for this request are not finite "
                           "(NaN or inf logits)", updates)
                continue
            if seqs is not None and not r.params.greedy:
                try:
                    chosen[span] = choose_tokens(logits[span], r.params, r.generator)
                except RuntimeError as e:  # torch.multinomial on probabilities that are not a distribution
                    self._fail(r, f"numerical failure while sampling: {e}", updates)
                    continue
            live.append((r, seqs, span))
        chosen_ids = chosen.tolist()
        chosen_lp = log_probs.gather(-1, chosen[:, None])[:, 0].tolist()
        for r, seqs, span in live:
            try:
                if seqs is None:
                    self._beam_step(r, log_probs[span], updates)
                elif not all(math.isfinite(lp) for lp in chosen_lp[span]):
                    self._fail(r, "numerical failure: a chosen token's log-probability is not finite", updates)
                else:
                    self._sample_step(r, seqs, chosen_ids[span], chosen_lp[span], log_probs[span], updates)
            except Exception as e:  # whatever else goes wrong with one request's step is that request's alone
                self._fail(r, f"decoding failed: {type(e).__name__}: {e}", updates)

    def _sample_step(self, r: Request, seqs: list[_Sequence], tokens: list[int], logprobs: list[float],
                     log_probs: Tensor, updates: list[Update]) -> None:
        p = r.params
        top = None
        if p.top_logprobs:
            values, ids = torch.topk(log_probs, min(p.top_logprobs, log_probs.shape[-1]), dim=-1)
            # Alternatives the model rules out (-inf) are reported at the floor: JSON has no infinities.
            top = [[(t, max(lp, LOG_PROB_FLOOR)) for t, lp in zip(i.tolist(), v.tolist(), strict=True)]
                   for i, v in zip(ids, values, strict=True)]
        deltas = [self._append(r, seq, token, logprobs[j], top[j] if top else None)
                  for j, (seq, token) in enumerate(zip(seqs, tokens, strict=True))]
        finished = all(s.done for s in r.sequences)
        if finished:
            r.finished_at = time.perf_counter()
            r.outputs = [s.out for s in r.sequences]
        updates.append(Update(r, deltas, finished))

    def _append(self, r: Request, seq: _Sequence, token: int, logprob: float,
                top: list[tuple[int, float]] | None) -> Delta:
        p, out = r.params, seq.out
        out.token_ids.append(token)
        out.logprobs.append(logprob)
        if out.top_logprobs is not None:
            out.top_logprobs.append(top or [])
        if self.eos is not None and token == self.eos and not p.ignore_eos:
            out.finish_reason = "stop"
        else:
            # A model's vocabulary may be padded past the tokenizer's: such tokens have no text.
            if token < self.tokenizer.vocab_size:
                out.text += seq.decoder.push(token)
            if out.finish_reason is None and len(out.token_ids) >= p.max_new_tokens:
                out.finish_reason = "length"
                out.text += seq.decoder.flush()
            if p.stop:
                self._check_stop(out, p.stop, already=seq.emitted)
        seq.pending = token
        # Streamed text holds back a tail that could still become a stop string.
        hold = 0 if out.finish_reason or not p.stop else max(len(s) for s in p.stop) - 1
        upto = max(seq.emitted, len(out.text) - hold)
        delta = Delta(out.index, out.text[seq.emitted : upto], [token], [logprob], [top or []] if top else None,
                      out.finish_reason)
        seq.emitted = upto
        return delta

    @staticmethod
    def _check_stop(out: SequenceOutput, stops: tuple[str, ...], already: int) -> None:
        """Cut the text before the earliest stop string; only the new tail can hold a new one."""
        start = max(0, already - max(len(s) for s in stops) + 1)
        found = [(i, s) for s in stops if (i := out.text.find(s, start)) >= 0]
        if found:
            at, stop = min(found)
            out.text, out.stop_string, out.finish_reason = out.text[:at], stop, "stop"

    def _beam_step(self, r: Request, log_probs: Tensor, updates: list[Update]) -> None:
        beams = r.beams
        assert beams is not None
        p = r.params
        parents = beams.step(log_probs, lambda toks: self._text_hits_stop(toks, p.stop) is not None)
        slots = torch.tensor(r.slots, device=self.device)
        self.model.copy_slots(self.state, slots[parents.to(self.device)], slots)
        if not beams.done:
            updates.append(Update(r, [], False))
            return
        results = beams.results()
        if not all(math.isfinite(x) for score, _, lps in results for x in (score, *lps)):
            # A candidate the model ruled out (-inf) can only finish when nothing better was left.
            self._fail(r, "numerical failure: a returned beam's log-probability is not finite", updates)
            return
        r.finished_at = time.perf_counter()
        r.outputs = []
        for i, (score, tokens, lps) in enumerate(results):
            out = SequenceOutput(index=i, token_ids=tokens, logprobs=lps, score=score)
            ended_eos = self.eos is not None and tokens and tokens[-1] == self.eos and not p.ignore_eos
            text = self._text(tokens[:-1] if ended_eos else tokens)
            stop = self._text_hits_stop(tokens, p.stop) if p.stop else None
            if stop is not None:
                text = text[: text.find(stop)]
            out.text, out.stop_string = text, stop
            out.finish_reason = "stop" if (ended_eos or stop is not None) else "length"
            r.outputs.append(out)
        deltas = [Delta(o.index, o.text, o.token_ids, o.logprobs, None, o.finish_reason) for o in r.outputs]
        updates.append(Update(r, deltas, True))

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode([t for t in tokens if t < self.tokenizer.vocab_size])

    def _text_hits_stop(self, tokens: list[int], stops: tuple[str, ...]) -> str | None:
        text = self._text(tokens)
        found = [(text.find(s), s) for s in stops if s in text]
        return min(found)[1] if found else None


def generate(model: LanguageModel, tokenizer: TextTokenizer, prompt_ids: list[int],
             params: GenerationParams, max_len: int | None = None) -> list[SequenceOutput]:
    """One request, run to the end in-process (tests, benchmarks, the CLI)."""
    engine = Engine(model, tokenizer, slots=params.slots_needed,
                    max_len=max_len or len(prompt_ids) + params.max_new_tokens)
    request = engine.submit(prompt_ids, params)
    while not request.finished:
        engine.step()
    if request.error is not None:
        raise RequestFailed(request.error)
    return request.outputs
