"""Speculative decoding (mistol/speculative.py) gives the plain decoding loop's output.

Greedy: token for token, on random-weight models in f32, int8 and int4, far past a sliding
window of 8 (so verify passes write across the rolling cache's wrap and are rolled back
there), with prompt-lookup and draft-model guesses, stops and max_tokens. Sampled: the
distribution of the first two tokens matches the one computed from the model's logits with
plain softmax/top-k arithmetic (a chi-square test).
"""

from __future__ import annotations

import threading

import pytest
import torch

from checkpoints import make_checkpoint
from mistol.engine import Engine
from mistol.sampling import SamplingParams
from mistol.speculative import DepthPolicy, Proposal, Speculation

# Repeats, so that prompt lookup finds matches from the first step on.
PROMPT = [1] + [5, 6, 7, 8, 9, 10] * 5 + [5, 6]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is fastest, and immune to other processes on the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def small_vocab_dir(tmp_path_factory):
    """Mistral, window 8, 64 tokens: small enough that greedy replies revisit n-grams."""
    return make_checkpoint(tmp_path_factory.mktemp("spec"), window=8, vocab=64, tokenizer=False, max_positions=512)


def plain(engine: Engine, prompt, params, **session) -> list[int]:
    speculation, engine.speculation = engine.speculation, None
    try:
        return list(engine.new_session(**session).generate(prompt, params))
    finally:
        engine.speculation = speculation


def speculative(engine: Engine, speculation: Speculation, prompt, params, **session):
    engine.speculation = speculation
    s = engine.new_session(**session)
    out = list(s.generate(prompt, params))
    return out, s


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_prompt_lookup_greedy_matches_plain_decoding_past_the_window(small_vocab_dir, quant):
    engine = Engine.load(small_vocab_dir, dtype="f32", quant=quant)
    params = SamplingParams(temperature=0, max_tokens=200)
    expected = plain(engine, PROMPT, params, chunk_size=16)
    out, session = speculative(engine, Speculation(adaptive=False, max_depth=6), PROMPT, params, chunk_size=16)
    assert out == expected
    stats = session.speculator.stats
    assert stats.verifies > 50 and stats.accepted > 0 and stats.accepted < stats.proposed  # kept and rolled back
    assert session.tokens == PROMPT + out[:-1]  # the last token yielded is not in the cache


def test_adaptive_prompt_lookup_matches_plain_decoding(small_vocab_dir):
    engine = Engine.load(small_vocab_dir, dtype="f32", quant="int8")
    params = SamplingParams(temperature=0, max_tokens=150, repetition_penalty=1.3)
    expected = plain(engine, PROMPT, params, chunk_size=16)
    out, _ = speculative(engine, Speculation(), PROMPT, params, chunk_size=16)
    assert out == expected


@pytest.mark.parametrize("draft_quant", [None, "int8"])
def test_draft_model_greedy_matches_plain_decoding(small_vocab_dir, draft_quant):
    engine = Engine.load(small_vocab_dir, dtype="f32")
    draft = engine if draft_quant is None else Engine.load(small_vocab_dir, dtype="f32", quant=draft_quant)
    params = SamplingParams(temperature=0, max_tokens=120)
    expected = plain(engine, PROMPT, params, chunk_size=16)
    out, session = speculative(engine, Speculation(draft=draft, adaptive=False, max_depth=5), PROMPT, params,
                               chunk_size=16)
    assert out == expected
    stats = session.speculator.stats
    if draft_quant is None:  # the model drafting for itself: every guess is right
        assert stats.accepted == stats.proposed >= 100
    else:
        assert 0 < stats.accepted < stats.proposed


def test_draft_with_another_vocabulary_is_refused(small_vocab_dir, tmp_path):
    from mistol.errors import MistolError
    from mistol.speculative import check_draft

    other = Engine.load(make_checkpoint(tmp_path / "other", vocab=80, tokenizer=False), dtype="f32")
    with pytest.raises(MistolError, match="vocabulary has 80 tokens.*same tokenizer"):
        check_draft(Engine.load(small_vocab_dir, dtype="f32"), other)


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 17, 60])
def test_stop_tokens_and_max_tokens_end_where_plain_decoding_ends(small_vocab_dir, max_tokens):
    engine = Engine.load(small_vocab_dir, dtype="f32")
    free = plain(engine, PROMPT, SamplingParams(temperature=0, max_tokens=80), chunk_size=16)
    stop = free[40]  # a token the reply reaches
    params = SamplingParams(temperature=0, max_tokens=max_tokens, stop_token_ids=[stop])
    expected = plain(engine, PROMPT, params, chunk_size=16)
    out, session = speculative(engine, Speculation(draft=engine, adaptive=False, max_depth=7), PROMPT, params,
                               chunk_size=16)
    assert out == expected
    assert len(out) <= max_tokens
    assert session.tokens == PROMPT + out[:-1]


def test_stream_with_stop_strings_and_rolled_back_cache(mistral_dir):
    """Text, finish reason and the next turn's reuse of the cache, after a stop string cut a
    reply in the middle of a verified run of guesses."""
    engine = Engine.load(mistral_dir, dtype="f32")
    tok = engine.tokenizer
    prompt = tok.encode("Hello there, how are you", add_bos=True)
    free = "".join(engine.new_session().stream(prompt, SamplingParams(temperature=0, max_tokens=40)))
    stop = free[len(free) // 2 : len(free) // 2 + 3]
    params = SamplingParams(temperature=0, max_tokens=40, stop=[stop])
    engine.speculation = None
    expected = "".join(engine.new_session().stream(prompt, params))
    engine.speculation = Speculation(draft=engine, adaptive=False, max_depth=8)
    session = engine.new_session()
    from mistol.generation import Generation

    result = Generation()
    text = "".join(session.stream(prompt, params, result))
    assert text == expected and result.finish_reason == "stop"
    assert result.draft_tokens > 0 and result.acceptance == 1.0
    # the cache holds the prompt and all of the reply but its last token: a follow-up reuses it
    assert session.tokens == prompt + result.token_ids[:-1]
    follow = prompt + result.token_ids + tok.encode(" ok")
    assert torch.allclose(session.feed(follow), engine.new_session().feed(follow), atol=1e-4)


def test_grammar_switches_speculation_off(mistral_dir):
    from mistol.constraints import Constraint, Grammars

    engine = Engine.load(mistral_dir, dtype="f32")
    tok = engine.tokenizer
    grammars = Grammars(tok)
    grammar = grammars.compile(Constraint("regex", "(ab|cd)+ x"))
    params = SamplingParams(temperature=0, max_tokens=20)
    prompt = tok.encode("Code:", add_bos=True)
    engine.speculation = None
    expected = list(engine.new_session().generate(prompt, params, grammars.start(grammar)))
    engine.speculation = Speculation(draft=engine, adaptive=False)
    session = engine.new_session()
    assert list(session.generate(prompt, params, grammars.start(grammar))) == expected
    assert session.speculator.stats.verifies == 0


class FixedGuesses:
    """Proposes the same tokens at every step: point masses, right some of the time."""

    source = None

    def __init__(self, tokens):
        self.tokens = tokens

    def extend(self, tokens):
        pass

    def propose(self, k, params, generator):
        return Proposal(self.tokens[:k], "fixed")

    def close(self):
        pass


class FixedSpeculation(Speculation):
    def __init__(self, tokens):
        super().__init__(adaptive=False, max_depth=len(tokens))
        self.tokens = tokens

    def proposer(self, session):
        return FixedGuesses(self.tokens)


def exact_pair_distribution(engine, prompt, temperature, top_k):
    """P(t1, t2) under softmax(top-k(logits) / temperature), from the model's logits."""
    session = engine.new_session()

    def probs(tokens):
        logits = session.feed(tokens).double()
        kth = logits.topk(top_k).values[-1]
        logits = torch.where(logits >= kth, logits / temperature, torch.tensor(float("-inf"), dtype=torch.double))
        return torch.softmax(logits, -1)

    p1 = probs(prompt)
    table = {}
    for t1 in p1.nonzero().flatten().tolist():
        p2 = probs(prompt + [t1])
        for t2 in p2.nonzero().flatten().tolist():
            table[(t1, t2)] = float(p1[t1] * p2[t2])
    return table


@pytest.mark.parametrize("source", ["fixed", pytest.param("draft", marks=pytest.mark.slow)])
def test_sampled_tokens_follow_the_models_distribution(small_vocab_dir, source):
    """Chi-square over the 16 (t1, t2) pairs of top-4 sampling, 1500 draws."""
    engine = Engine.load(small_vocab_dir, dtype="f32")
    temperature, top_k, draws = 1.5, 4, 1500
    prompt = PROMPT[:12]
    expected = exact_pair_distribution(engine, prompt, temperature, top_k)
    if source == "fixed":
        first = max(expected, key=expected.get)  # the likeliest pair: guesses right about half the time
        speculation = FixedSpeculation([first[1], first[0]])
    else:
        speculation = Speculation(draft=Engine.load(small_vocab_dir, dtype="f32", quant="int4"),
                                  adaptive=False, max_depth=2)
    engine.speculation = speculation
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=1.0, min_p=0.0, max_tokens=2, seed=0)
    assert_pairs_follow(engine, prompt, params, expected, draws)


def assert_pairs_follow(engine: Engine, prompt, params: SamplingParams, expected: dict, draws: int) -> None:
    """`draws` two-token replies, seeds 0, 1, ...: both branches of the rejection rule ran, and
    the pairs' chi-square against `expected` stays under 37.7, the 0.1% critical value for up
    to 15 degrees of freedom."""
    session = engine.new_session()
    counts: dict[tuple[int, int], int] = {}
    for _ in range(draws):
        pair = tuple(session.generate(prompt, params))
        counts[pair] = counts.get(pair, 0) + 1
        params.seed += 1
    stats = session.speculator.stats
    assert 0 < stats.accepted < stats.proposed  # both branches of the rejection rule ran
    assert set(counts) <= set(expected) and len(expected) > 1
    chi2 = sum((counts.get(pair, 0) - draws * p) ** 2 / (draws * p) for pair, p in expected.items())
    assert chi2 < 37.7, (chi2, counts)


def test_sampled_tokens_follow_llama_cpps_order_of_filters(small_vocab_dir):
    """As above, with temperature last (llama.cpp's order): min-p judges the untempered top-4,
    so the draft's guesses are checked against that distribution."""
    engine = Engine.load(small_vocab_dir, dtype="f32")
    temperature, top_k, min_p, draws = 1.5, 4, 0.3, 1500
    prompt = PROMPT[:12]
    session = engine.new_session()

    def probs(tokens):
        logits = session.feed(tokens).double()
        inf = torch.tensor(float("-inf"), dtype=torch.double)
        logits = torch.where(logits >= logits.topk(top_k).values[-1], logits, inf)
        p = torch.softmax(logits, -1)
        return torch.softmax(torch.where(p >= min_p * p.max(), logits / temperature, inf), -1)

    p1 = probs(prompt)
    expected = {(t1, t2): float(p1[t1] * p2[t2]) for t1 in p1.nonzero().flatten().tolist()
                for p2 in [probs(prompt + [t1])] for t2 in p2.nonzero().flatten().tolist()}
    first = max(expected, key=expected.get)
    engine.speculation = FixedSpeculation([first[1], first[0]])
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=1.0, min_p=min_p, max_tokens=2, seed=0,
                            order=("top_k", "min_p", "temperature"))
    assert_pairs_follow(engine, prompt, params, expected, draws)


def test_depth_policy_stops_guessing_when_guesses_fail_and_probes_again():
    policy = DepthPolicy(max_depth=8)
    assert policy.depth("lookup1", 8) == 0  # nothing timed yet: a plain step first
    policy.timed_step(0.010)
    policy.timed_verify(0.0105, 9)  # an extra row costs ~0.6% of a step
    assert policy.depth("lookup3", 8) == 8  # cheap rows, prior acceptance 2/3: guess all
    policy.row_cost = 0.1  # dearer rows (a CPU's verify at 7B)
    for _ in range(30):
        policy.observe("lookup1", 8, 0)
    assert policy.depth("lookup1", 8) == 0
    depths = [policy.depth("lookup1", 8) for _ in range(64)]
    assert depths.count(1) == 2 and depths.count(0) == 62  # a one-guess probe every 32 steps
    for _ in range(30):
        policy.observe("lookup3", 8, 8)
    assert policy.depth("lookup3", 8) == 8  # right every time: as deep as allowed
    policy.row_cost = 0.5  # rows as dear as on a compute-bound device: fewer guesses
    for _ in range(30):
        policy.observe("lookup2", 8, 3)
    assert 0 < policy.depth("lookup2", 16) < 8


def test_server_request_alone_speculates_with_the_plain_output(mistral_dir):
    """A request alone in the scheduler's batch verifies guesses (here the model drafting for
    itself: every guess right), with logprobs and a stop token; the text, ids and logprobs
    are those of the same request decoded one token per step."""
    from mistol.server.scheduler import Job, Scheduler

    engine = Engine.load(mistral_dir, dtype="f32")
    prompt = engine.tokenizer.encode("One two three, one two three, one two", add_bos=True)
    free = plain(engine, prompt, SamplingParams(temperature=0, max_tokens=30))
    results = {}
    for name, speculation in [("plain", None), ("draft", Speculation(draft=engine, adaptive=False, max_depth=6))]:
        engine.speculation = speculation
        sched = Scheduler(engine, max_batch=2, max_context=256)
        outputs = []
        done = threading.Event()

        def collect(output, outputs=outputs, done=done):
            outputs.append(output)
            if output.finish_reason is not None:
                done.set()

        params = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[free[20]])
        sched.start()
        try:
            sched.submit(Job(prompt, params, collect, logprobs=2))
            assert done.wait(60)
        finally:
            sched.stop()
        results[name] = outputs
        if speculation is not None:
            stats = sched.pool.sessions[0].speculator.stats
            assert stats.verifies > 0 and stats.accepted == stats.proposed
    plain_out, spec_out = results["plain"], results["draft"]
    assert spec_out[-1].token_ids == plain_out[-1].token_ids == free[:21]
    assert "".join(o.text for o in spec_out) == "".join(o.text for o in plain_out)
    def logprobs(outputs):
        return [(lp.token, round(lp.logprob, 3), [t for t, _ in lp.top]) for o in outputs for lp in o.logprobs]

    assert logprobs(spec_out) == logprobs(plain_out) and len(logprobs(plain_out)) == 20


@pytest.mark.slow  # two runs of the command (~6 s each; more on a busy machine)
def test_generate_command_with_a_draft_prints_the_plain_text_and_the_share_kept(mistral_dir, small_vocab_dir):
    import subprocess
    import sys

    engine = Engine.load(mistral_dir, dtype="f32")
    engine.speculation = None
    prompt = engine.tokenizer.encode("The quick brown fox", add_bos=True)
    params = SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[2, 32000])
    expected = "".join(engine.new_session().stream(prompt, params))
    command = [sys.executable, "-m", "mistol", "generate", "--model", str(mistral_dir), "--prompt", "The quick brown fox",
               "--max-tokens", "24", "--temperature", "0", "--verbose"]
    out = subprocess.run([*command, "--draft", str(mistral_dir)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected + "\n"
    assert "100% of" in out.stderr and "guesses kept" in out.stderr
    refused = subprocess.run([*command, "--draft", str(small_vocab_dir)], capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    (error,) = [line for line in refused.stderr.splitlines() if "error" in line]
    assert error.startswith("mistol: error: --draft") and "vocabulary has 64 tokens" in error
