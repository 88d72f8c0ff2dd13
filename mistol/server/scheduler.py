"""The engine loop: one thread owns the engine and decodes every active request together.

Continuous batching. Requests wait in a queue; between two decode steps the loop admits
at most one of them (while fewer than `max_batch` run) and prefills its prompt, and from
then on the request is a row of `Engine.decode_step`, one forward pass for all active
requests: decoding is bound by reading the weights, so B rows cost little more than one. A
request leaves the batch the moment it finishes or is cancelled; its session goes back to
the pool.

Chunked prefill. While other requests decode, a new prompt runs `prefill_chunk` tokens at a
time, one chunk between two decode steps, so a long prompt arriving delays the running
streams by one chunk per token instead of stalling them for the whole prompt (a 2,000-token
prompt on a CPU: many seconds). With nothing decoding, a prompt runs whole, at full speed.

Prefix cache. Clients resend the whole conversation each turn. Finished sessions stay in a
small LRU pool (one KV cache each) with the tokens they hold, and a new request gets the
free session that shares the longest prefix with its prompt, so `Session.feed` runs only
the tokens past it: a follow-up turn prefills only what the client added.

Threads. HTTP handlers (an asyncio loop) only `submit` jobs and set `Job.cancelled`; the
engine thread alone touches sessions and the model, and hands text back through each job's
`on_output` callback (the server's callback posts it into the handler's asyncio queue).
Cancellation is a flag checked before every step: a client that goes away frees its slot
within one step, and its session keeps what it had computed, for the cache.

Other work on the model (the hidden states an embeddings request pools) goes through
`call`: it runs on the engine thread between two steps, so it never races a decode.

A request with an output constraint (a JSON schema, regex or grammar; see constraints.py)
carries its own `TokenGrammar`: its row's logits are masked before sampling and the grammar
advances with each token, so constrained and free requests decode together in one batch.

Speculative decoding (speculative.py) runs only for a request alone in the batch: several
rows batched already share each read of the weights, and a verify pass per row would cost
them more than it saves.

Each request samples with its own `SamplingParams` and seeded generator, exactly as
`Session.generate` does, so a greedy request gives the same tokens as `mistol generate`
(batched rows may differ from one-row steps in the last float bits; see the tests).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..constraints import TokenGrammar
from ..engine import Engine, Session
from ..errors import MistolError
from ..sampling import SamplingParams, sample_next
from ..stops import StopFilter
from ..util import common_prefix

log = logging.getLogger("mistol.server")

MAX_WAITING = 256  # queued requests beyond this are refused (503) rather than piled up
PREFILL_CHUNK = 256  # prompt tokens run between two decode steps while other requests decode


@dataclass
class TokenLogprob:
    token: str  # the token's text as it appears in the output (a byte piece as "<0xNN>")
    logprob: float
    top: list[tuple[str, float]]  # the most likely tokens of that step, most likely first


@dataclass
class Output:
    """What one step adds to a request; the last one has `finish_reason` set."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", or "error" (with `error`)
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # counting a stop token the model emitted
    cached_tokens: int = 0  # prompt tokens that were already in the session's cache
    token_ids: list[int] = field(default_factory=list)  # on the last output: every generated id


class Job:
    """One request inside the scheduler. Only `cancel()` may be called from other threads."""

    def __init__(
        self,
        prompt: Sequence[int],
        params: SamplingParams,
        on_output: Callable[[Output], None],
        logprobs: int | None = None,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        logit_bias: dict[int, float] | None = None,
        client: Hashable = None,
        grammar: TokenGrammar | None = None,
    ):
        self.prompt = list(prompt)
        self.grammar = grammar  # the constraint's walk, or None for free text
        self.client = client  # whose cached prefixes this job may reuse (see SessionPool)
        self.params = params
        self.on_output = on_output
        self.logprobs = logprobs  # None: off; k: the chosen token and the top k
        self.frequency_penalty = frequency_penalty
        self.presence_penalty = presence_penalty
        self.logit_bias = dict(logit_bias or {})
        self.cancelled = False
        # engine-thread state
        self.session: Session | None = None
        self.next_token: int | None = None  # sampled, to be fed by the next decode step
        self.generator: torch.Generator | None = None
        self.decoder = None  # the tokenizer's stream decoder: token ids -> text
        self.stops: StopFilter | None = None
        self.token_ids: list[int] = []
        self.cached_tokens = 0
        self.prefilled = 0  # prompt tokens the session holds so far (chunked prefill)
        self._processed_before = 0
        self._counts: dict[int, int] = {}
        self._held_logprobs: list[TokenLogprob] = []
        self.proposer = None  # where speculative guesses come from, while the job decodes alone
        self.proposed = 0  # context tokens the proposer has seen

    def cancel(self) -> None:
        self.cancelled = True

    def adjusted(self, logits: torch.Tensor) -> torch.Tensor:
        """Logit bias and OpenAI's frequency/presence penalties (over the generated tokens)."""
        if not (self.logit_bias or (self._counts and (self.frequency_penalty or self.presence_penalty))):
            return logits
        logits = logits.clone()
        if self.logit_bias:
            ids = torch.tensor(list(self.logit_bias))
            logits[ids] += torch.tensor(list(self.logit_bias.values()), dtype=logits.dtype)
        if self._counts and (self.frequency_penalty or self.presence_penalty):
            ids = torch.tensor(list(self._counts))
            counts = torch.tensor(list(self._counts.values()), dtype=logits.dtype)
            logits[ids] -= self.frequency_penalty * counts + self.presence_penalty
        return logits


class SessionPool:
    """Sessions (KV caches) kept for reuse, least recently used first.

    A request gets the free session sharing the longest prefix with its prompt when that
    session's tokens all lie on the prompt (the same conversation, continued), or when the
    prefix covers at least half the prompt (a regenerated or edited turn); otherwise an empty
    session, or a fresh one while the pool has room (so that a shared BOS and template header do not
    overwrite another conversation's cache), and once it is full, the best match or else
    the least recently used session.

    Sessions belong to a client (any hashable: the server passes its API key's identity):
    only a session holding the same client's tokens is matched, and one taken over from
    another client is emptied first. Otherwise how much of a prompt was cached (or how fast
    it came back) would tell one client, token by token, what another had sent.
    """

    def __init__(self, engine: Engine, size: int, max_context: int | None = None):
        self.engine = engine
        self.size = size
        self.max_context = max_context
        self.sessions: list[Session] = [engine.new_session(max_context=max_context)]
        self._free: list[Session] = list(self.sessions)  # least recently used first
        self._client: dict[int, Hashable] = {}  # id(session) -> the client whose tokens it holds

    def acquire(self, prompt: Sequence[int], client: Hashable = None) -> Session:
        session = self._choose(prompt, client)
        if session.tokens and self._client.get(id(session)) != client:
            session.reset()  # another client's tokens are never this one's prefix
        self._client[id(session)] = client
        return session

    def _choose(self, prompt: Sequence[int], client: Hashable) -> Session:
        best, best_n = None, 0
        for s in self._free:
            if self._client.get(id(s)) != client:
                continue
            n = common_prefix(s.tokens, prompt)
            if n > best_n:
                best, best_n = s, n
        continues = best is not None and (best_n == len(best.tokens) or 2 * best_n >= len(prompt))
        if not continues:
            empty = next((s for s in self._free if not s.tokens), None)
            if empty is not None:  # as fresh as a new one, and its cache is already allocated
                self._free.remove(empty)
                return empty
            if len(self.sessions) < self.size:
                best = self.engine.new_session(max_context=self.max_context)
                self.sessions.append(best)
                return best
        best = best or self._free[0]
        self._free.remove(best)
        return best

    def release(self, session: Session) -> None:
        self._free.append(session)

    # -- across restarts (`mistol serve --kv-dir`) --------------------------------------------
    def save(self, directory: Path, label: Callable[[Hashable], str | None]) -> int:
        """Write every session that holds tokens to `directory` (see kv_file.py), with the label
        of its client (None: not kept, e.g. a prefix that is nobody else's). Returns how many."""
        from ..kv_file import save

        for old in directory.glob("prefix-*.kv"):
            old.unlink()
        saved = 0
        for session in self.sessions:
            client = label(self._client.get(id(session)))
            if session.tokens and client is not None:
                save(session, directory / f"prefix-{saved}.kv", {"client": client})
                saved += 1
        return saved

    def load(self, directory: Path, client_of: Callable[[str], Hashable]) -> list[str]:
        """Take the sessions saved in `directory`, as idle cached prefixes of their clients
        (`client_of(label)`, KeyError for a client this server does not have); returns why
        each file that was not taken was not."""
        from ..kv_file import restore

        skipped = []
        for path in sorted(directory.glob("prefix-*.kv")):
            if len(self.sessions) >= self.size:
                skipped.append(f"{path.name}: the pool is full")
                continue
            session = self._free.pop() if self._free and not self._free[-1].tokens else \
                self.engine.new_session(max_context=self.max_context)
            extra, why_not = restore(session, path)
            try:
                client = client_of(str(extra.get("client"))) if not why_not else None
            except KeyError:
                why_not = f"{path}: its client (API key) is not one of this server's"
            if why_not:
                session.reset()
                skipped.append(why_not)
            else:
                self._client[id(session)] = client
            if session not in self.sessions:
                self.sessions.append(session)
            self._free.append(session)
        return skipped

    @property
    def idle(self) -> int:
        return len(self._free)


class Scheduler:
    def __init__(
        self, engine: Engine, max_batch: int = 4, max_context: int | None = None, pool_size: int | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
    ):
        if max_batch < 1 or prefill_chunk < 1:
            raise ValueError("max_batch and prefill_chunk must be >= 1")
        self.prefill_chunk = prefill_chunk
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_batch = max_batch
        self.pool = SessionPool(engine, pool_size or max_batch + 4, max_context)
        self.max_context = self.pool.sessions[0].max_context
        self._active: list[Job] = []
        self._prefilling: collections.deque[Job] = collections.deque()  # admitted, prompt not yet all run
        self._waiting: collections.deque[Job] = collections.deque()
        self._calls: collections.deque[tuple[Callable, tuple, concurrent.futures.Future]] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._piece_cache: dict[int, str] = {}
        self.counters = dict(requests=0, prefill_tokens=0, cached_tokens=0, decode_tokens=0, steps=0,
                             peak_batch=0, cancelled=0, errors=0)

    # -- the HTTP side ---------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="mistol-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, job: Job) -> bool:
        """Queue a job; False when the queue is full (the caller answers 503)."""
        with self._cond:
            if len(self._waiting) >= MAX_WAITING:
                return False
            self._waiting.append(job)
            self._cond.notify()
        return True

    def call(self, fn: Callable, *args) -> concurrent.futures.Future:
        """Run fn(*args) on the engine thread between two steps; the future holds its result
        or its exception (a stopped scheduler fails it)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopping or self._thread is None:
                future.set_exception(RuntimeError("the server is shutting down"))
                return future
            self._calls.append((fn, args, future))
            self._cond.notify()
        return future

    def kv_usage(self) -> tuple[int, int, int]:
        """(tokens held, token capacity, bytes) over the pool's KV caches: a snapshot read
        without stopping the engine thread, exact enough for monitoring."""
        sessions = list(self.pool.sessions)
        return (sum(len(s.tokens) for s in sessions), sum(s.cache.capacity for s in sessions),
                sum(s.cache.nbytes for s in sessions))

    def stats(self) -> dict:
        return {**self.counters, "active": len(self._active), "prefilling": len(self._prefilling),
                "waiting": len(self._waiting),
                "max_batch": self.max_batch, "sessions": len(self.pool.sessions),
                "max_context": self.max_context}

    # -- the engine thread -----------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                job = self._next_job()
                if self._stopping:
                    break
                self._run_call()
                self._drop_cancelled()
                if job is not None:
                    self._guarded(job, self._admit, job)
                if self._prefilling:
                    head = self._prefilling[0]
                    self._guarded(head, self._prefill, head)
                if self._active:
                    self._step()
            # still in inference mode: failing a running job resets its cache's tensors
            with self._cond:
                leftover = [*self._active, *self._prefilling, *self._waiting]
                self._waiting.clear()
                calls = list(self._calls)
                self._calls.clear()
            for job in leftover:
                self._fail(job, "the server is shutting down")
            for _, _, future in calls:
                future.set_exception(RuntimeError("the server is shutting down"))

    def _guarded(self, job: Job, fn, *args) -> None:
        """Run fn; if it raises, fail this one job: the loop and the other requests go on."""
        try:
            fn(*args)
        except MistolError as e:  # complete on its own (non-finite logits, say): no traceback
            log.error("request failed: %s", e)
            self._fail(job, str(e))
        except Exception as e:  # noqa: BLE001
            log.exception("request failed in the engine loop")
            self._fail(job, f"{type(e).__name__}: {e}")

    def _next_job(self) -> Job | None:
        with self._cond:
            while (not self._stopping and not self._active and not self._prefilling and not self._waiting
                   and not self._calls):
                self._cond.wait()
            while self._waiting and self._waiting[0].cancelled:
                self._waiting.popleft()
                self.counters["cancelled"] += 1
            if self._waiting and len(self._active) + len(self._prefilling) < self.max_batch:
                return self._waiting.popleft()
        return None

    def _run_call(self) -> None:
        """One queued `call` per turn of the loop, so that decoding goes on between them."""
        with self._cond:
            if not self._calls:
                return
            fn, args, future = self._calls.popleft()
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args))
        except Exception as e:  # noqa: BLE001 - the caller gets it; the loop goes on
            future.set_exception(e)

    def _drop_cancelled(self) -> None:
        for job in [j for j in [*self._active, *self._prefilling] if j.cancelled]:
            self._remove(job)
            self.pool.release(job.session)  # what it holds stays useful to the cache
            job.session = None
            self.counters["cancelled"] += 1

    def _remove(self, job: Job) -> None:
        if job in self._active:
            self._active.remove(job)
        if job in self._prefilling:
            self._prefilling.remove(job)

    def _admit(self, job: Job) -> None:
        if job.cancelled:
            self.counters["cancelled"] += 1
            return
        self.counters["requests"] += 1
        job.session = session = self.pool.acquire(job.prompt, job.client)
        job._processed_before = session.tokens_processed
        job.prefilled = min(common_prefix(session.tokens, job.prompt), len(job.prompt) - 1)
        self._prefilling.append(job)

    def _prefill(self, job: Job) -> None:
        """Run the next chunk of the job's prompt (all of it when nothing else decodes); at
        the end, the job joins the decoding batch with its first token."""
        session = job.session
        chunk = self.prefill_chunk if self._active else len(job.prompt)
        upto = min(len(job.prompt), job.prefilled + chunk)
        logits = session.feed(job.prompt[:upto])  # runs only what the session does not hold
        job.prefilled = upto
        if upto < len(job.prompt):
            return
        self._prefilling.remove(job)
        logits = logits.cpu()  # sampling, like the generators, runs on the CPU
        prefilled = session.tokens_processed - job._processed_before
        self.counters["prefill_tokens"] += prefilled
        job.cached_tokens = max(0, len(job.prompt) - prefilled)
        self.counters["cached_tokens"] += job.cached_tokens
        job.generator = job.params.make_generator()
        job.decoder = self.tokenizer.stream_decoder()
        job.stops = StopFilter(job.params.stop)
        self._active.append(job)
        self._advance(job, logits)

    def _step(self) -> None:
        jobs = list(self._active)
        speculator = jobs[0].session.speculator if len(jobs) == 1 else None
        if speculator is not None and jobs[0].params.repetition_penalty == 1.0:
            verified = self._speculative_step(jobs[0], speculator)
            if verified:
                return
        start = time.perf_counter()
        try:
            logits = self.engine.decode_step([j.session for j in jobs], [j.next_token for j in jobs]).cpu()
        except Exception as e:  # noqa: BLE001
            log.exception("decode step failed")
            for job in jobs:
                self._fail(job, f"decode step failed: {type(e).__name__}: {e}")
            return
        if speculator is not None:
            speculator.timed_step(time.perf_counter() - start)
        self.counters["steps"] += 1
        self.counters["peak_batch"] = max(self.counters["peak_batch"], len(jobs))
        for job, row in zip(jobs, logits):
            self._guarded(job, self._advance, job, row)

    def _speculative_step(self, job: Job, speculator) -> bool:
        """Alone in the batch, a request's next token runs with guesses after it (see
        speculative.py); False when no guess pays now. Each row is sampled exactly as a
        plain step's would be, and the pass ends at the first token sampled that is not the
        guess, so the output and its distribution are the plain loop's."""
        session = job.session
        context = [*session.tokens, job.next_token]
        if job.proposer is None:
            job.proposer, job.proposed = speculator.speculation.proposer(session), len(session.tokens)
        job.proposer.extend(context[job.proposed :])
        job.proposed = len(context)
        limit = min(session.verify_rows() - 1, job.params.max_tokens - len(job.token_ids),
                    session.max_context - len(context))
        try:
            verified = speculator.verify(session, job.proposer, job.next_token, job.params, job.generator, limit)
        except MistolError as e:  # a draft model's non-finite logits, say
            self._fail(job, str(e))
            return True
        except Exception as e:  # noqa: BLE001
            self._fail(job, f"decode step failed: {type(e).__name__}: {e}")
            return True
        if verified is None:
            return False
        proposal, rows = verified
        self.counters["steps"] += 1
        errors, kept = self.counters["errors"], 0
        for guess, row in zip([*proposal.tokens, None], rows):
            self._guarded(job, self._advance, job, row)
            if job.token_ids[-1] != guess:  # the guess fell: the rows after it are void
                break
            kept += 1
            if job.session is None:  # finished
                break
        if self.counters["errors"] == errors:  # (a failed job's session was emptied)
            speculator.settle(session, proposal, kept, rows)
        return True

    def _advance(self, job: Job, logits: torch.Tensor) -> None:
        """Sample the job's next token from `logits`, and pass on the text it completes."""
        params = job.params
        context = torch.tensor(job.session.tokens) if params.repetition_penalty != 1.0 else None
        adjusted = job.adjusted(logits)
        if job.grammar is not None:
            adjusted = job.grammar.mask(adjusted, params.stop_token_ids)
        token = sample_next(adjusted, params, job.generator, context)
        job.token_ids.append(token)
        job._counts[token] = job._counts.get(token, 0) + 1
        self.counters["decode_tokens"] += 1
        stop_token = token in params.stop_token_ids
        if job.grammar is not None and not stop_token:
            job.grammar.advance(token)
        if job.logprobs is not None and not stop_token:
            job._held_logprobs.append(self._logprob(logits, token, job.logprobs))
        # the text as `Session.stream` gives it: at a stop token, an unfinished character
        # in the decoder is dropped; at max_tokens, it is flushed
        if stop_token:
            text, finish = job.stops.flush(), "stop"
        else:
            text = job.stops.push(job.decoder.push(token))
            finish = "stop" if job.stops.stopped else None
            if finish is None and job.grammar is not None and job.grammar.finished:
                # the grammar can take nothing more: the reply is complete without a stop token
                text += job.stops.push(job.decoder.flush()) + job.stops.flush()
                finish = "stop"
            if finish is None and len(job.token_ids) >= params.max_tokens:
                text += job.stops.push(job.decoder.flush()) + job.stops.flush()
                finish = "stop" if job.stops.stopped else "length"
        if finish is not None:
            self._finish(job, text, finish)
            return
        job.next_token = token
        if text:
            self._emit(job, Output(text=text, logprobs=self._take_logprobs(job)))

    def _finish(self, job: Job, text: str, reason: str) -> None:
        self._active.remove(job)
        self.pool.release(job.session)
        job.session = None
        self._emit(job, Output(
            text=text, logprobs=self._take_logprobs(job), finish_reason=reason,
            prompt_tokens=len(job.prompt), completion_tokens=len(job.token_ids),
            cached_tokens=job.cached_tokens, token_ids=list(job.token_ids),
        ))

    def _fail(self, job: Job, message: str) -> None:
        self.counters["errors"] += 1
        self._remove(job)
        if job.session is not None:
            job.session.reset()  # its cache may be half written
            self.pool.release(job.session)
            job.session = None
        self._emit(job, Output(finish_reason="error", error=message, prompt_tokens=len(job.prompt),
                               completion_tokens=len(job.token_ids)))

    def _emit(self, job: Job, output: Output) -> None:
        try:
            job.on_output(output)
        except Exception:  # noqa: BLE001 - e.g. the handler's event loop has closed
            job.cancel()

    @staticmethod
    def _take_logprobs(job: Job) -> list[TokenLogprob]:
        held, job._held_logprobs = job._held_logprobs, []
        return held

    # -- log-probabilities -------------------------------------------------------------------
    def _logprob(self, logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
        """From the model's own distribution (before temperature, penalties and bias)."""
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        top = []
        if k:
            values, ids = logprobs.topk(k)
            top = [(self._piece(int(i)), float(v)) for v, i in zip(values, ids)]
        return TokenLogprob(self._piece(token), float(logprobs[token]), top)

    def _piece(self, token: int) -> str:
        """A token's text with its leading space (decode() strips the first one)."""
        piece = self._piece_cache.get(token)
        if piece is None:
            item_of = getattr(self.tokenizer, "_item", None)
            item = item_of(token, False) if item_of else self.tokenizer.decode([token], skip_special=False)
            piece = f"<0x{item:02X}>" if isinstance(item, int) else (item or "")
            self._piece_cache[token] = piece
        return piece
