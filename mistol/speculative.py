"""Speculative decoding: several tokens per forward pass, with the same output.

Decoding reads every weight once per token. A forward pass over k+1 positions reads them
once too, so when k tokens can be guessed, one pass checks them all: the pending token and
the guesses run together, the logits at each position say whether the next guess is what
the model would have chosen, and the cache is rolled back past the first wrong one.

Guesses come from a `Proposer`:
- `PromptLookup`: the tokens that followed the last earlier occurrence of the context's
  last 3 (else 2, else 1) tokens. Free, and right often when a reply restates what it was
  shown (code being edited, numbers being quoted).
- `DraftModel`: a small model of the same vocabulary decoding k tokens ahead.

Exactness: with greedy sampling a guess is kept only if it is the argmax the plain loop
would take, and the token after the last kept guess is that argmax, so the output is the
plain output token for token. On a CPU with quantized weights a pass of up to
`backend.FUSED_MAX_ROWS` rows runs through the compiled layers as decode steps do, each row
with a step's bits; elsewhere (float weights, CUDA) a pass adds in another order than a
one-row step, so an exact tie may round the other way. With sampling, guess t (drawn from the
proposal q) is kept with probability min(1, p(t) / q(t)), and on rejection the token is
drawn from max(0, p - q) renormalized (Leviathan et al. 2023, Chen et al. 2023): each token
is distributed exactly as p, whatever q is. A prompt-lookup guess is a point mass: kept with
probability p(t), else drawn from p without t.

When it pays: `DepthPolicy` keeps a decaying estimate of how often guesses are right (per
source: a 3-token match predicts better than a 1-token one) and of what an extra row costs
relative to a one-token step (timed as the loop runs), and picks the k that maximizes
expected tokens per unit of time; k = 0 (a plain step) when no k pays, with a one-guess
probe now and then so a later stretch of repeated text is still noticed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from .errors import MistolError
from .sampling import SamplingParams, check_weights, draw_device, greedy_token, penalized, sample_next, sampling_weights

# Sessions and engines (mistol/engine.py, which imports this module) appear here unannotated:
# `session` is an `engine.Session`, `draft`/`target` an `engine.Engine`.

MAX_DEPTH = 16  # most guesses verified in one pass
NGRAM_MAX = 3  # prompt lookup matches the last 3, 2, then 1 tokens
# A guess's chance of being right before any was tried, by source: a 1-token match
# often just meets a common token again.
PRIORS = {"lookup3": 2 / 3, "lookup2": 1 / 2, "lookup1": 1 / 4}
MARGIN = 0.05  # speculate only where the model of the costs expects 5% more tokens per second
ROW_COST_PRIOR = 0.25  # an extra row's cost (fraction of a one-token step) until one is timed: modest first passes


@dataclass
class Proposal:
    tokens: list[int]
    source: str  # which acceptance estimate it feeds ("lookup3", "draft"...)
    probs: list[torch.Tensor] | None = None  # the proposal distribution q of each token; None: point masses


class Proposer(Protocol):
    """Where guesses come from. It sees the context as it grows (`extend`, kept tokens only)."""

    source: str | None  # set when every proposal has one source (then k is decided before proposing)

    def extend(self, tokens: Sequence[int]) -> None: ...

    def propose(self, k: int, params: SamplingParams, generator: torch.Generator) -> Proposal | None:
        """Up to k tokens to follow the context, or None."""

    def close(self) -> None: ...


class PromptLookup:
    """Guesses copied from the context: what followed the most recent earlier occurrence of
    the last n tokens (n = 3, 2, 1). An index of n-grams, updated as tokens are appended,
    keeps each proposal O(k)."""

    source = None  # the proposal says which (n decides how good a guess is)

    def __init__(self, context: Sequence[int]):
        self.tokens: list[int] = []
        self.index: dict[tuple[int, ...], int] = {}  # n-gram -> where its latest continuation starts
        self.extend(context)

    def extend(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            self.tokens.append(int(t))
            end = len(self.tokens) - 1  # the n-grams ending just before the new token now have a continuation
            for n in range(1, NGRAM_MAX + 1):
                if end - n >= 0:
                    self.index[tuple(self.tokens[end - n : end])] = end

    def propose(self, k: int, params: SamplingParams, generator) -> Proposal | None:
        for n in range(min(NGRAM_MAX, len(self.tokens)), 0, -1):
            start = self.index.get(tuple(self.tokens[-n:]))
            if start is not None:
                return Proposal(self.tokens[start : start + k], f"lookup{n}")
        return None

    def close(self) -> None:
        pass


class DraftModel:
    """Guesses from a smaller model of the same vocabulary, decoded k tokens ahead in a
    session of its own (its cache follows the accepted text, rolled back like the target's)."""

    source = "draft"

    def __init__(self, draft, context: Sequence[int], max_context: int):
        self.session = draft.new_session(max_context=max_context)
        self.tokens = [int(t) for t in context]

    def extend(self, tokens: Sequence[int]) -> None:
        self.tokens.extend(int(t) for t in tokens)

    def propose(self, k: int, params: SamplingParams, generator) -> Proposal | None:
        k = min(k, self.session.max_context - len(self.tokens))
        if k <= 0:
            return None
        logits = self.session.feed(self.tokens)
        guesses, probs = [], []
        for i in range(k):
            context = torch.tensor(self.tokens + guesses) if params.repetition_penalty != 1.0 else None
            scores = penalized(logits.float().cpu(), params, context)
            if params.greedy:
                guesses.append(greedy_token(scores))
            else:
                q = sampling_weights(scores, params)
                check_weights(q, scores)
                guesses.append(int(torch.multinomial(q.to(draw_device(q, generator)), 1, generator=generator)))
                probs.append(q)
            if i < k - 1:
                logits = self.session.step(guesses[-1])
        return Proposal(guesses, "draft", None if params.greedy else probs)

    def close(self) -> None:
        self.session.reset()


def check_draft(target, draft) -> None:
    """Raise a one-line error unless `draft` shares `target`'s vocabulary."""
    if draft.config.vocab_size != target.config.vocab_size:
        raise MistolError(f"--draft {draft.name}: its vocabulary has {draft.config.vocab_size} tokens, "
                          f"{target.name}'s has {target.config.vocab_size}; a draft model needs the same tokenizer")
    a, b = _tokenizer_or_none(draft), _tokenizer_or_none(target)
    if a is not None and b is not None and a.vocab_bytes() != b.vocab_bytes():
        raise MistolError(f"--draft {draft.name}: its tokens differ from {target.name}'s; "
                          "a draft model needs the same tokenizer")


def _tokenizer_or_none(engine):
    try:
        return engine.tokenizer
    except MistolError:  # a model without a tokenizer: its vocabulary size is all we can compare
        return None


@dataclass
class Speculation:
    """How an engine's sessions speculate: prompt lookup, or `draft` when given."""

    draft: object | None = None  # an `engine.Engine` of the same vocabulary; None: prompt lookup
    max_depth: int = MAX_DEPTH
    adaptive: bool = True  # False: always propose max_depth guesses (for tests and measurements)

    def proposer(self, session) -> Proposer:
        if self.draft is not None:
            return DraftModel(self.draft, session.tokens, session.max_context)
        return PromptLookup(session.tokens)


@dataclass
class SpeculationStats:
    proposed: int = 0  # guesses verified
    accepted: int = 0  # of those, kept
    verifies: int = 0  # forward passes over guesses
    steps: int = 0  # plain one-token steps

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0


@dataclass
class DepthPolicy:
    """Chooses how many guesses to verify: from the guesses' estimated acceptance and an
    extra row's measured cost (see the module docstring)."""

    max_depth: int = MAX_DEPTH
    adaptive: bool = True
    decay: float = 0.9  # weight of the past per verify pass
    probe_every: int = 32  # least plain steps between one-guess probes once speculation stopped paying
    step_seconds: float | None = None  # a one-token step, decaying average
    row_cost: float | None = None  # an extra row's time as a fraction of a step, decaying average
    counts: dict[str, list[float]] = field(default_factory=dict)  # source -> [kept, tried]
    idle_steps: int = 0

    def acceptance(self, source: str) -> float:
        kept, tried = self.counts.get(source, (0.0, 0.0))
        prior = PRIORS.get(source, 2 / 3)  # worth 1.5 guesses of evidence
        return (kept + 1.5 * prior) / (tried + 1.5)

    def depth(self, source: str, available: int) -> int:
        """Guesses to verify out of `available` (0 = take a plain step)."""
        if not self.adaptive:
            return min(available, self.max_depth)
        if available <= 0 or self.step_seconds is None:
            return 0  # the first step is timed plainly: the cost model needs it
        a = min(self.acceptance(source), 0.99)
        cost = ROW_COST_PRIOR if self.row_cost is None else self.row_cost
        best, best_rate = 0, 1.0 + MARGIN
        expected = 1.0
        for k in range(1, min(available, self.max_depth) + 1):
            expected += a**k  # tokens a pass of k guesses yields on average
            rate = expected / (1.0 + cost * k)
            if rate > best_rate:
                best, best_rate = k, rate
        if best == 0:
            self.idle_steps += 1
            # a probe costs `cost` steps: spaced so that probing costs at most 1% of the time
            if self.idle_steps >= max(self.probe_every, 100 * cost):
                self.idle_steps = 0
                return 1
        return best

    def observe(self, source: str, tried: int, kept: int) -> None:
        counts = self.counts.setdefault(source, [0.0, 0.0])
        # a pass that kept j of k guesses tested j + 1 of them (the first wrong one ends it)
        counts[0] = self.decay * counts[0] + kept
        counts[1] = self.decay * counts[1] + min(tried, kept + 1)

    def timed_step(self, seconds: float) -> None:
        self.step_seconds = seconds if self.step_seconds is None else 0.8 * self.step_seconds + 0.2 * seconds

    def timed_verify(self, seconds: float, rows: int) -> None:
        if self.step_seconds is not None and rows > 1:
            cost = max(0.0, (seconds / self.step_seconds - 1.0) / (rows - 1))
            self.row_cost = cost if self.row_cost is None else 0.8 * self.row_cost + 0.2 * cost


class Speculator:
    """A session's speculative decoding: the policy and its statistics, kept across replies."""

    def __init__(self, speculation: Speculation):
        self.speculation = speculation
        self.policy = DepthPolicy(speculation.max_depth, speculation.adaptive)
        self.stats = SpeculationStats()
        self._pass_start = 0.0

    def generate(self, session, logits: torch.Tensor, params: SamplingParams,
                 generator: torch.Generator) -> Iterator[int]:
        """`Session.generate` after the prompt ran (`logits`: after its last token), speculating."""
        stop_ids = set(params.stop_token_ids)
        # k + 1 rows per pass fit a prefill chunk, and rolling back k of them never loses a
        # key the rolling cache still needs (the cache keeps `chunk` positions beyond the window)
        room = session.verify_rows() - 1
        base = len(session.tokens)
        proposer = self.speculation.proposer(session)
        emitted = 0
        try:
            queue = [_sample(logits, params, generator, session.tokens, params.repetition_penalty)]
            while True:
                for token in queue:
                    emitted += 1  # before the yield: the caller may stop right there
                    yield token
                    if token in stop_ids or emitted == params.max_tokens:
                        return
                kept, following = self._advance(session, proposer, queue[-1], params, generator,
                                                min(room, params.max_tokens - emitted))
                queue = [*kept, following]
        finally:
            # the contract of `Session.generate`: the cache holds all but the last token yielded
            _roll_back(session, base + max(emitted - 1, 0))
            proposer.close()

    def _advance(self, session, proposer: Proposer, pending: int, params: SamplingParams, generator,
                 limit: int) -> tuple[list[int], int]:
        """Run `pending`, with up to `limit` guesses after it when they pay. Returns the kept
        guesses and the token that follows them."""
        proposer.extend([pending])
        verified = self.verify(session, proposer, pending, params, generator, limit)
        if verified is None:
            start = time.perf_counter()
            rows = session.step(pending)[None].float().cpu()
            self.timed_step(time.perf_counter() - start)
            proposal, guesses = None, []
        else:
            proposal, rows = verified
            guesses = proposal.tokens
        base = len(session.tokens) - len(guesses)  # tokens up to and including `pending`
        penalty = params.repetition_penalty
        kept: list[int] = []
        following = None
        for i, guess in enumerate(guesses):
            q = proposal.probs[i] if proposal.probs is not None else None
            ok, instead = _check(rows[i], guess, q, params, generator, session.tokens[: base + i], penalty)
            if not ok:
                following = instead
                break
            kept.append(guess)
        if proposal is not None:
            self.settle(session, proposal, len(kept), rows)
        proposer.extend(kept)
        if following is None:  # every guess kept (or none made): the next token from the last row
            following = _sample(rows[len(kept)], params, generator, session.tokens, penalty)
        return kept, following

    def verify(self, session, proposer: Proposer, pending: int, params: SamplingParams, generator,
               limit: int) -> tuple[Proposal, torch.Tensor] | None:
        """Guess up to `limit` tokens after `pending` (the proposer's context ends with it) and
        run them all in one pass: the proposal (its tokens cut to those run) and the float32
        logits after each of its k + 1 tokens, on the CPU. None, with nothing run, when no
        guess pays now: take a plain step (and time it with `timed_step`). Then `settle`."""
        policy = self.policy
        start = time.perf_counter()  # a draft model's guesses cost time too: count them with the rows
        limit = min(limit, policy.max_depth)
        if proposer.source is not None:  # guesses that cost time to make: decide how many first
            limit = policy.depth(proposer.source, limit)
        proposal = proposer.propose(limit, params, generator) if limit > 0 else None
        k = policy.depth(proposal.source, len(proposal.tokens)) if proposal else 0
        if k == 0:
            return None
        proposal.tokens = proposal.tokens[:k]
        rows = session.verify([pending, *proposal.tokens]).float().cpu()
        self._pass_start = start  # timed until `settle`: checking and rolling back cost too
        self.stats.verifies += 1
        return proposal, rows

    def settle(self, session, proposal: Proposal, kept: int, rows: torch.Tensor) -> None:
        """After `verify`: the first `kept` guesses stood. Roll the session back past the others."""
        self.policy.timed_verify(time.perf_counter() - self._pass_start, len(proposal.tokens) + 1)
        self.stats.proposed += len(proposal.tokens)
        self.stats.accepted += kept
        self.policy.observe(proposal.source, len(proposal.tokens), kept)
        _roll_back(session, len(session.tokens) - len(proposal.tokens) + kept)
        session.keep_logits(rows[kept])

    def timed_step(self, seconds: float) -> None:
        """A plain one-token step took `seconds`: what the cost of a verify pass is weighed against."""
        self.policy.timed_step(seconds)
        self.stats.steps += 1


def _roll_back(session, length: int) -> None:
    """Truncate to `length` tokens, uncounting the dropped ones from `tokens_processed`: it
    counts the work a conversation's text took, the same with or without speculation (a
    rolled-back guess is the price of a pass, counted in its time)."""
    dropped = max(0, len(session.tokens) - length)
    session.truncate(length)
    session.tokens_processed -= dropped


def _sample(logits: torch.Tensor, params: SamplingParams, generator, context: Sequence[int], penalty: float) -> int:
    return sample_next(logits.float().cpu(), params, generator, torch.tensor(context) if penalty != 1.0 else None)


def _check(logits: torch.Tensor, guess: int, q: torch.Tensor | None, params: SamplingParams, generator,
           context: Sequence[int], penalty: float) -> tuple[bool, int | None]:
    """Whether `guess` stands at a position whose logits are `logits`; if not, the token to
    emit there instead (see the module docstring)."""
    scores = penalized(logits, params, torch.tensor(context) if penalty != 1.0 else None)
    if params.greedy:
        best = greedy_token(scores)
        return best == guess, None if best == guess else best
    p = sampling_weights(scores, params)
    check_weights(p, scores)
    q_guess = 1.0 if q is None else float(q[guess])
    if float(torch.rand(1, generator=generator)) * q_guess < float(p[guess]):
        return True, None
    residual = p.clone()
    if q is None:
        residual[guess] = 0.0
    else:
        residual = (residual - q).clamp_min_(0.0)
    if float(residual.sum()) <= 0.0:  # p == q up to rounding: rejection had probability ~0
        residual = p
    return False, int(torch.multinomial(residual.to(draw_device(residual, generator)), 1, generator=generator))
