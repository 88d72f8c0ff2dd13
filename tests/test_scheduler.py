"""The server's engine loop and its session pool, driven directly (no HTTP): a full queue,
shutdown with requests in flight, one request failing among others, and the pool's reuse rule.
A tiny random Mistral checkpoint runs every step for real."""

from __future__ import annotations

import threading

import pytest

from mistol.engine import Engine
from mistol.sampling import SamplingParams
from mistol.server import scheduler as scheduler_module
from mistol.server.scheduler import Job, Output, Scheduler, SessionPool

CONTEXT = 256


@pytest.fixture(scope="module")
def engine(mistral_dir):
    return Engine.load(mistral_dir, dtype="f32")


class Collector:
    """A job's outputs, with an event set by the final one."""

    def __init__(self):
        self.outputs: list[Output] = []
        self.done = threading.Event()

    def __call__(self, output: Output) -> None:
        self.outputs.append(output)
        if output.finish_reason is not None:
            self.done.set()

    @property
    def final(self) -> Output:
        assert self.done.is_set(), "the job never finished"
        return self.outputs[-1]

    @property
    def text(self) -> str:
        return "".join(o.text for o in self.outputs)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens)


def job(prompt, max_tokens=8, **kwargs) -> tuple[Job, Collector]:
    out = Collector()
    return Job(prompt, greedy(max_tokens), out, **kwargs), out


def test_queue_full_is_refused_not_piled_up(engine, monkeypatch):
    monkeypatch.setattr(scheduler_module, "MAX_WAITING", 3)
    sched = Scheduler(engine, max_batch=1, max_context=CONTEXT)  # not started: nothing drains the queue
    accepted = [sched.submit(job([1, 5, 6])[0]) for _ in range(5)]
    assert accepted == [True, True, True, False, False]
    assert sched.stats()["waiting"] == 3


def test_full_queue_answers_503_over_http(engine, monkeypatch):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from helpers import LoopbackServer
    from mistol.server import ServerOptions, create_app

    monkeypatch.setattr(scheduler_module, "MAX_WAITING", 0)
    app = create_app(engine, ServerOptions(model_name="tiny", max_batch=1, max_context=CONTEXT))
    with LoopbackServer(app) as url:
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "server_busy"


def test_results_match_session_generate(engine):
    prompt = [1, 100, 200, 300, 400]
    ref = engine.new_session(max_context=CONTEXT).generate(prompt, greedy(12))
    sched = Scheduler(engine, max_batch=2, max_context=CONTEXT)
    sched.start()
    try:
        j, out = job(prompt, max_tokens=12)
        assert sched.submit(j)
        assert out.done.wait(60)
    finally:
        sched.stop()
    assert out.final.finish_reason == "length"
    assert out.final.token_ids == list(ref)


def test_shutdown_answers_every_request(engine):
    sched = Scheduler(engine, max_batch=1, max_context=CONTEXT)
    jobs = [job([1, 10 + i, 20 + i], max_tokens=200) for i in range(4)]  # one runs, three wait
    sched.start()
    for j, _ in jobs:
        assert sched.submit(j)
    first = jobs[0][1]
    for _ in range(200):  # until the first request is decoding
        if first.outputs:
            break
        threading.Event().wait(0.05)
    sched.stop()
    for _, out in jobs:
        assert out.done.is_set(), "a request was left without a final answer"
        assert out.final.finish_reason in ("error", "length", "stop")
    reasons = [out.final.error for _, out in jobs if out.final.finish_reason == "error"]
    assert reasons and all("shutting down" in r for r in reasons)
    assert sched.stats()["active"] == 0 and sched.stats()["waiting"] == 0


def test_a_failing_request_fails_alone(engine):
    sched = Scheduler(engine, max_batch=4, max_context=CONTEXT)
    good, good_out = job([1, 7, 8, 9], max_tokens=10)
    too_long, too_long_out = job([1] + [5] * (CONTEXT + 10), max_tokens=4)  # its prefill raises
    bad_bias, bad_bias_out = job([1, 3, 4], max_tokens=4, logit_bias={10**9: 1.0})  # its sampling raises
    sched.start()
    try:
        for j in (good, too_long, bad_bias):
            assert sched.submit(j)
        for out in (good_out, too_long_out, bad_bias_out):
            assert out.done.wait(60)
    finally:
        sched.stop()
    assert too_long_out.final.finish_reason == "error" and too_long_out.final.error
    assert bad_bias_out.final.finish_reason == "error" and bad_bias_out.final.error
    assert good_out.final.finish_reason == "length" and len(good_out.final.token_ids) == 10
    ref = engine.new_session(max_context=CONTEXT).generate([1, 7, 8, 9], greedy(10))
    assert good_out.final.token_ids == list(ref)
    assert sched.stats()["errors"] == 2


def test_cancelled_request_frees_its_slot(engine):
    sched = Scheduler(engine, max_batch=1, max_context=CONTEXT)
    long_job, long_out = job([1, 2, 3], max_tokens=10_000)
    next_job, next_out = job([1, 4, 5], max_tokens=3)
    sched.start()
    try:
        assert sched.submit(long_job) and sched.submit(next_job)
        long_job.cancel()
        assert next_out.done.wait(60), "the queued request never got the cancelled one's slot"
    finally:
        sched.stop()
    assert next_out.final.finish_reason == "length"


# -- the pool's reuse rule --------------------------------------------------------------------
def fed(pool: SessionPool, prompt: list[int]):
    session = pool.acquire(prompt)
    session.feed(prompt)
    pool.release(session)
    return session


def test_pool_continues_the_same_conversation(engine):
    pool = SessionPool(engine, size=3, max_context=CONTEXT)
    first = fed(pool, [1, 10, 11, 12])
    again = pool.acquire([1, 10, 11, 12, 13, 14])  # the client resent it with more on the end
    assert again is first
    assert again.tokens_processed >= 4  # its cache covers the shared prefix


def test_pool_gives_an_unrelated_prompt_a_fresh_session_while_it_has_room(engine):
    pool = SessionPool(engine, size=3, max_context=CONTEXT)
    first = fed(pool, [1, 10, 11, 12, 13, 14])
    other = pool.acquire([1, 50, 51, 52, 53, 54])  # shares only BOS: do not overwrite the first
    assert other is not first and len(pool.sessions) == 2


def test_pool_reuses_an_edited_turn_covering_half_the_prompt(engine):
    pool = SessionPool(engine, size=3, max_context=CONTEXT)
    first = fed(pool, [1, 10, 11, 12, 13, 14, 15])
    edited = pool.acquire([1, 10, 11, 12, 99, 98])  # 4 of 6 shared: a regenerated turn
    assert edited is first


def test_full_pool_takes_best_match_then_least_recently_used(engine):
    pool = SessionPool(engine, size=2, max_context=CONTEXT)
    a = fed(pool, [1, 10, 11, 12])
    b = fed(pool, [1, 20, 21, 22])
    assert len(pool.sessions) == 2
    assert pool.acquire([1, 20, 30, 31, 32, 33, 34]) is b  # full: the longest prefix wins (2 > 1)
    pool.release(b)
    assert pool.acquire([2, 3, 4]) is a  # no prefix at all: the least recently used


def test_call_runs_between_steps_on_the_engine_thread(engine):
    """Other model work (embeddings) runs on the engine's thread while requests decode, its
    errors go back to the caller, and the requests' tokens are the ones decoded alone."""
    alone, alone_out = job([1, 5, 6, 7], max_tokens=24)
    sched = Scheduler(engine, max_batch=2, max_context=CONTEXT)
    sched.start()
    try:
        sched.submit(alone)
        assert alone_out.done.wait(60)
        running, out = job([1, 5, 6, 7], max_tokens=24)
        sched.submit(running)
        threads = [sched.call(lambda: threading.current_thread().name) for _ in range(5)]
        hidden = sched.call(engine.hidden_states, [1, 5, 6, 7])
        failing = sched.call(engine.hidden_states, [])
        assert [f.result(60) for f in threads] == ["mistol-engine"] * 5
        assert hidden.result(60).shape == (4, engine.config.hidden_size)
        with pytest.raises(Exception, match="empty"):
            failing.result(60)
        assert out.done.wait(60) and out.final.token_ids == alone_out.final.token_ids
    finally:
        sched.stop()
    with pytest.raises(RuntimeError, match="shutting down"):
        sched.call(lambda: None).result(5)


def test_a_long_prompt_is_prefilled_in_chunks_between_the_running_streams_steps(engine):
    """While one stream decodes, a 120-token prompt runs 8 tokens at a time: the stream keeps
    getting tokens during that prefill (one step per chunk), and the new request's tokens are
    those of a prefill in one go."""
    long_prompt = [1] + [100 + (i * 37) % 900 for i in range(119)]
    ref = list(engine.new_session(max_context=CONTEXT).generate(long_prompt, greedy(6)))

    sched = Scheduler(engine, max_batch=2, max_context=CONTEXT, prefill_chunk=8)
    events: list[str] = []

    class Recorder(Collector):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def __call__(self, output):
            events.append(self.name)
            super().__call__(output)

    runner_out, newcomer_out = Recorder("runner"), Recorder("newcomer")
    runner = Job([1, 5, 6, 7], greedy(100), runner_out)
    newcomer = Job(long_prompt, greedy(6), newcomer_out)
    sched.start()
    try:
        sched.submit(runner)
        while len(runner_out.outputs) < 3:
            threading.Event().wait(0.01)
        before = len(events)
        sched.submit(newcomer)
        assert newcomer_out.done.wait(120) and runner_out.done.wait(120)
    finally:
        sched.stop()
    assert newcomer_out.final.token_ids == ref
    # the runner's outputs from the newcomer's arrival to its first token: one per chunk
    steps_while_prefilling = events[before : events.index("newcomer")].count("runner")
    assert steps_while_prefilling >= 120 // 8 - 3, events[:40]
