"""`mistol serve`: a real server on a loopback port, spoken to with the official `openai`
client (and raw httpx where the client would hide what we check). No mocks."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from helpers import LoopbackServer  # noqa: E402
from mistol.chat_template import ChatTemplate  # noqa: E402
from mistol.engine import Engine  # noqa: E402
from mistol.generation import Generation  # noqa: E402
from mistol.sampling import SamplingParams  # noqa: E402

KEY = "sk-test-key"
MODEL = "tiny-hermes"
CONTEXT = 1024  # per request (the fixture's window is 8, so a session's cache holds 520)


@pytest.fixture(scope="module")
def server(mistral_dir):
    from mistol.server import ServerOptions, create_app

    engine = Engine.load(mistral_dir, dtype="f32")
    app = create_app(engine, ServerOptions(model_name=MODEL, api_key=KEY, max_batch=8, max_context=CONTEXT))
    with LoopbackServer(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        yield SimpleNamespace(url=url, engine=engine, client=client, http=http,
                              template=ChatTemplate.for_tokenizer(engine.tokenizer))
        http.close()


def health(server) -> dict:
    r = server.http.get("/health")
    assert r.status_code == 200
    return r.json()


def reference(server, prompt: list[int], max_tokens: int, stop_ids, stop=()) -> tuple[str, Generation]:
    """What `Session.stream` (and so `mistol generate` / `mistol chat`) gives, greedy."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, stop_token_ids=list(stop_ids), stop=list(stop))
    result = Generation()
    text = "".join(server.engine.new_session(max_context=CONTEXT).stream(prompt, params, result))
    return text, result


def chat_messages(question: str) -> list[dict]:
    return [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": question}]


def completion_stop_ids(engine) -> list[int]:
    return sorted({i for i in (engine.tokenizer.eos_id, engine.config.eos_token_id) if i is not None})


# -- the happy paths ------------------------------------------------------------------------
def test_models_and_health(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert server.client.models.retrieve(MODEL).id == MODEL
    state = health(server)
    assert state["status"] == "ok" and state["max_context"] == CONTEXT and state["max_batch"] == 8


def test_chat_greedy_matches_session_generate_with_usage(server):
    messages = chat_messages("Name three colours.")
    r = server.client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=20)
    prompt = server.template.render(messages)
    text, ref = reference(server, prompt, 20, server.template.stop_ids)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    assert isinstance(r.created, int)
    choice = r.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.message.content == text
    assert choice.finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == ref.completion_tokens
    assert r.usage.total_tokens == len(prompt) + ref.completion_tokens


def test_chat_stream_matches_non_streaming_and_ends_with_done(server):
    messages = chat_messages("Count to five.")
    whole = server.client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=16)
    chunks = list(server.client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=16, stream=True,
        stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])

    body = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 4, "stream": True}
    raw = server.http.post("/v1/chat/completions", json=body)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.split("\n\n") if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert "usage" not in json.loads(events[1][6:])  # only with stream_options.include_usage


def test_completions_match_mistol_generate(server):
    tok = server.engine.tokenizer
    prompt = tok.encode("The capital of France is", add_bos=True)
    text, ref = reference(server, prompt, 12, completion_stop_ids(server.engine))
    r = server.client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=12)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert r.choices[0].text == text and r.choices[0].finish_reason == ref.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), ref.completion_tokens)
    streamed = server.client.completions.create(
        model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=12, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text
    by_ids = server.client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=12)
    assert by_ids.choices[0].text == text


def test_stop_strings_cut_the_reply(server):
    messages = chat_messages("Write a long sentence.")
    full = server.client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=30)
    text = full.choices[0].message.content
    assert len(text) > 12
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    expected = text[: text.find(stop)]
    r = server.client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=30,
                                              stop=[stop, "never-appears"])
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    ref_text, _ = reference(server, server.template.render(messages), 30, server.template.stop_ids, [stop])
    assert ref_text == expected
    chunks = server.client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=30,
                                                   stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


def test_max_tokens_finishes_with_length(server):
    r = server.client.chat.completions.create(model=MODEL, messages=chat_messages("Hi"), temperature=0,
                                              max_completion_tokens=5, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    # without max_tokens the reply may fill the context, and no more
    r = server.client.completions.create(model=MODEL, prompt="Once", temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens + r.usage.completion_tokens == CONTEXT and r.choices[0].finish_reason == "length"


def test_logprobs_of_chosen_and_top_tokens(server):
    import torch

    messages = chat_messages("Say something.")
    r = server.client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=6,
                                              logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens - (r.choices[0].finish_reason == "stop")
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].token == item.token  # greedy picks the most likely token
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob)
        values = [t.logprob for t in item.top_logprobs]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
    assert "".join(item.token for item in content).strip() == r.choices[0].message.content.strip()
    logits = server.engine.new_session(max_context=CONTEXT).feed(server.template.render(messages))
    expected = torch.log_softmax(logits, -1).topk(3).values.tolist()
    assert [t.logprob for t in content[0].top_logprobs] == pytest.approx(expected, abs=1e-4)


def test_seed_makes_sampling_reproducible_and_logit_bias_applies(server):
    kw = dict(model=MODEL, messages=chat_messages("Tell a story."), temperature=1.0, max_tokens=12)
    a = server.client.chat.completions.create(seed=7, **kw).choices[0].message.content
    b = server.client.chat.completions.create(seed=7, **kw).choices[0].message.content
    c = server.client.chat.completions.create(seed=8, **kw).choices[0].message.content
    assert a == b and a != c
    token = server.engine.tokenizer.encode("hello")[-1]
    r = server.client.completions.create(model=MODEL, prompt="x", max_tokens=4, logit_bias={str(token): 100},
                                         frequency_penalty=0.5, presence_penalty=0.5, temperature=0.7)
    assert r.choices[0].text == server.engine.tokenizer.decode([token] * 4)


def test_mistol_remote_client_speaks_to_the_server(server):
    from mistol.remote import OpenAICompatibleLLM

    llm = OpenAICompatibleLLM(server.url, api_key=KEY)
    messages = chat_messages("Hello there.")
    params = SamplingParams(temperature=0, max_tokens=10)
    text = "".join(llm.chat(messages, params))
    expected, _ = reference(server, server.template.render(messages), 10, server.template.stop_ids)
    assert llm.model == MODEL and text == expected and llm.last.prompt_tokens == len(server.template.render(messages))
    # continue_final_message: the model goes on writing the last (assistant) message
    partial = messages + [{"role": "assistant", "content": expected[:5]}]
    more = "".join(llm.chat(partial, SamplingParams(temperature=0, max_tokens=4), continue_last=True))
    prompt = server.template.render(partial, continue_last=True)
    assert more == reference(server, prompt, 4, server.template.stop_ids)[0]


# -- batching and the prefix cache ----------------------------------------------------------
def test_eight_concurrent_greedy_requests_equal_one_at_a_time(server):
    questions = [f"Question number {i}: what is {i} plus {i}?" for i in range(8)]

    def ask(q):
        r = server.client.chat.completions.create(model=MODEL, messages=chat_messages(q), temperature=0,
                                                  max_tokens=24)
        return r.choices[0].message.content, r.choices[0].finish_reason

    sequential = [ask(q) for q in questions]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, questions))
    # Batched rows may differ from one-row steps in the last float bits; greedy tokens must not.
    assert together == sequential
    assert health(server)["peak_batch"] >= 4  # they really were decoded together
    for q, (text, _) in zip(questions[:2], sequential):
        assert text == reference(server, server.template.render(chat_messages(q)), 24, server.template.stop_ids)[0]


def test_resent_history_prefills_only_the_new_tokens(server):
    first = chat_messages("Explain what a prefix cache is, in one line.")
    r1 = server.client.chat.completions.create(model=MODEL, messages=first, temperature=0, max_tokens=10)
    follow_up = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                         {"role": "user", "content": "And why does it help?"}]
    before = health(server)["prefill_tokens"]
    r2 = server.client.chat.completions.create(model=MODEL, messages=follow_up, temperature=0, max_tokens=4)
    prefilled = health(server)["prefill_tokens"] - before
    cached = r2.usage.prompt_tokens_details.cached_tokens
    # The session holds the first prompt and the reply, but for the last token sampled
    # (a stop token or the max_tokens-th), which was never fed.
    assert cached == r1.usage.prompt_tokens + r1.usage.completion_tokens - 1
    assert prefilled == r2.usage.prompt_tokens - cached
    # what the client added after the reply: <|im_end|>\n<|im_start|>user\n...<|im_start|>assistant\n
    render = server.template.render
    added = len(render(follow_up)) - len(render(follow_up[:3], continue_last=True))
    assert prefilled == added + 1 < r2.usage.prompt_tokens // 2


def test_client_disconnect_mid_stream_frees_its_slot(server):
    before = health(server)
    body = {"model": MODEL, "prompt": "Go on and on", "max_tokens": 1000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with server.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == 3:
                break
    deadline = time.monotonic() + 10
    while (state := health(server))["active"] or state["cancelled"] == before["cancelled"]:
        assert time.monotonic() < deadline, f"the cancelled request still holds its slot: {state}"
        time.sleep(0.01)
    assert state["cancelled"] == before["cancelled"] + 1
    assert state["decode_tokens"] - before["decode_tokens"] < 1000
    start = time.monotonic()
    r = server.client.completions.create(model=MODEL, prompt="Next", max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason in ("length", "stop") and time.monotonic() - start < 10


# -- refusals -------------------------------------------------------------------------------
def test_api_key_is_required(server):
    plain = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": chat_messages("hi")})
    wrong = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer nope"})
    for r in (plain, wrong):
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(server.url + "/health").status_code == 200  # health needs no key


HI = [{"role": "user", "content": "hi"}]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
BAD_REQUESTS = [
    # (id, path, JSON body or raw bytes, status, param)
    ("malformed-json", CHAT, b"{bad", 400, None),
    ("empty-body", CHAT, b"", 400, None),
    ("not-an-object", CHAT, b"[1, 2]", 400, None),
    ("not-utf8", CHAT, b"\xff\xfe{}", 400, None),
    ("deeply-nested", CHAT, b"[" * 100_000 + b"]" * 100_000, 400, None),
    # a missing or unknown model: answered by default, refused with --strict-model (test_server_compat.py)
    ("no-messages", CHAT, {"model": MODEL}, 400, "messages"),
    ("messages-not-a-list", CHAT, {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("empty-messages", CHAT, {"model": MODEL, "messages": []}, 400, "messages"),
    ("bad-role", CHAT, {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("content-not-text", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": 42}]}, 400,
     "messages[0].content"),
    ("image-part", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400, "messages[0].content[0]"),
    ("temperature-string", CHAT, {"model": MODEL, "messages": HI, "temperature": "hot"}, 400, "temperature"),
    ("temperature-negative", CHAT, {"model": MODEL, "messages": HI, "temperature": -1}, 400, "temperature"),
    ("top-p-zero", CHAT, {"model": MODEL, "messages": HI, "top_p": 0}, 400, "top_p"),
    ("max-tokens-zero", CHAT, {"model": MODEL, "messages": HI, "max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-string", CHAT, {"model": MODEL, "messages": HI, "max_tokens": "ten"}, 400, "max_tokens"),
    ("n-too-many", CHAT, {"model": MODEL, "messages": HI, "n": 17}, 400, "n"),
    ("stop-number", CHAT, {"model": MODEL, "messages": HI, "stop": 5}, 400, "stop"),
    ("top-logprobs-alone", CHAT, {"model": MODEL, "messages": HI, "top_logprobs": 2}, 400, "top_logprobs"),
    ("top-logprobs-too-many", CHAT, {"model": MODEL, "messages": HI, "logprobs": True, "top_logprobs": 50}, 400,
     "top_logprobs"),
    ("logprobs-string", CHAT, {"model": MODEL, "messages": HI, "logprobs": "yes"}, 400, "logprobs"),
    ("tools", CHAT, {"model": MODEL, "messages": HI, "tools": [{"type": "function"}]}, 400, "tools"),
    ("penalty-out-of-range", CHAT, {"model": MODEL, "messages": HI, "frequency_penalty": 5}, 400,
     "frequency_penalty"),
    ("seed-string", CHAT, {"model": MODEL, "messages": HI, "seed": "x"}, 400, "seed"),
    ("seed-too-big", CHAT, {"model": MODEL, "messages": HI, "seed": 2**80}, 400, "seed"),
    ("stream-options-string", CHAT, {"model": MODEL, "messages": HI, "stream_options": "yes"}, 400,
     "stream_options"),
    ("logit-bias-key", CHAT, {"model": MODEL, "messages": HI, "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("beyond-context", CHAT, {"model": MODEL, "messages": HI, "max_tokens": 100_000}, 400, "max_tokens"),
    ("no-prompt", COMPLETIONS, {"model": MODEL}, 400, "prompt"),
    ("token-out-of-vocab", COMPLETIONS, {"model": MODEL, "prompt": [1, 99_999_999]}, 400, "prompt"),
    ("two-prompts", COMPLETIONS, {"model": MODEL, "prompt": ["a", "b"]}, 400, "prompt"),
    ("prompt-too-long", COMPLETIONS, {"model": MODEL, "prompt": [1] * (CONTEXT + 1)}, 400, "prompt"),
]


@pytest.mark.parametrize("path,body,status,param", [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_openai_errors(server, path, body, status, param):
    if isinstance(body, bytes):
        r = server.http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        r = server.http.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and "Traceback" not in r.text
    assert error["type"] == "invalid_request_error" and error["param"] == param


def test_context_overflow_names_both_numbers(server):
    prompt = server.template.render(HI)
    r = server.http.post(CHAT, json={"model": MODEL, "messages": HI, "max_tokens": 5000})
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "context_length_exceeded"
    assert f"({len(prompt)} tokens)" in error["message"] and "(5000)" in error["message"]
    assert str(CONTEXT) in error["message"]


def test_wrong_method_path_and_oversized_body(server):
    assert server.http.get(CHAT).status_code == 405
    missing = server.http.get("/v1/nothing-here")
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}
    big = {"model": MODEL, "messages": [{"role": "user", "content": "x" * (5 << 20)}]}
    r = server.http.post(CHAT, json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_server_keeps_serving_after_bad_requests(server):
    state = health(server)
    assert state["errors"] == 0 and state["active"] == 0
    r = server.client.chat.completions.create(model=MODEL, messages=HI, temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason in ("length", "stop")


def test_serve_command_line_defaults_are_safe():
    import argparse

    from mistol.commands.serve import is_loopback, register

    sub = argparse.ArgumentParser().add_subparsers(dest="command")
    register(sub)
    args = sub.choices["serve"].parse_args(["--model", "m"])
    assert (args.host, args.port, args.api_key, args.max_batch, args.ctx) == ("127.0.0.1", 8000, None, 4, None)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")


def test_terminal_chat_against_our_own_server(server, tmp_path):
    """`mistol chat --api URL`: the same chat, served by `mistol serve`, with the same replies."""
    pexpect = pytest.importorskip("pexpect")
    import os
    import sys

    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path), "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "mistol", "chat", "--api", server.url + "/v1", "--api-key", KEY,
                                           "-t", "0", "--max-tokens", "8", "--system", "You are a helpful assistant.",
                                           "--no-code"], env=env, encoding="utf-8", timeout=120, dimensions=(40, 200))
    try:
        child.expect_exact(">>>")
        child.sendline("hello")
        child.expect_exact(">>>")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    from mistol.chat.log import replay

    (log,) = (tmp_path / "mistol" / "chats").glob("*.jsonl")
    messages = replay(log)
    prompt = server.template.render(chat_messages("hello"))
    expected, _ = reference(server, prompt, 8, server.template.stop_ids)
    assert messages[-1] == {"role": "assistant", "content": expected}


# -- the prefix cache is not an oracle for another client's prompt -----------------------------
DIGITS = [28734, 28740, 28750, 28770, 28781, 28782, 28784, 28787, 28783, 28774]  # "0".."9" (Mistral v0.1)
SECRET_PIN = [DIGITS[4], DIGITS[8], DIGITS[2], DIGITS[1]]
FILLER = 1000  # any token that is not a digit


def cached_tokens(http, prompt: list[int], key: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = http.post(COMPLETIONS, json={"model": MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0},
                  headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]


def guess_next_digit(http, victim: list[int], known: list[int], key: str | None = None,
                     victim_key: str | None = None) -> list[int]:
    """The attack: while the victim keeps sending `victim` (a prompt that starts with `known`),
    send `known + d + filler` for each digit d and read cached_tokens (a prompt's last token
    always runs, hence the filler). On a leaking server the right digit scores one more."""
    cached_tokens(http, known + [FILLER, FILLER], key)  # warm up on our own prefix first
    scores = []
    for d in DIGITS:
        cached_tokens(http, victim, victim_key)
        scores.append(cached_tokens(http, known + [d, FILLER], key))
    return scores


def start(mistral_dir, **options):
    from mistol.server import ServerOptions, create_app

    engine = Engine.load(mistral_dir, dtype="f32")
    return engine, LoopbackServer(create_app(engine, ServerOptions(model_name=MODEL, max_batch=2,
                                                                   max_context=CONTEXT, **options)))


def test_a_client_cannot_read_another_keys_prompt_from_cached_tokens(mistral_dir):
    engine, server = start(mistral_dir, api_key=["key-A", "key-B"])
    base = engine.tokenizer.encode("The door code for the server room is", add_bos=True)
    with server as url, httpx.Client(base_url=url, timeout=60) as http:
        cached_tokens(http, base + SECRET_PIN, "key-A")  # the victim
        # ... whose own follow-up still finds its prompt cached
        assert cached_tokens(http, base + SECRET_PIN + [DIGITS[5]], "key-A") >= len(base) + len(SECRET_PIN)
        victim = base + SECRET_PIN
        for known in (base, base + SECRET_PIN[:1], base + SECRET_PIN[:3]):
            scores = guess_next_digit(http, victim, known, "key-B", "key-A")
            assert len(set(scores)) == 1, f"the right digit stands out: {scores}"
        # the same key is the same client, whose cache is shared: there the attack works
        scores = guess_next_digit(http, victim, base, "key-A", "key-A")
        assert scores[4] == len(base) + 1 and scores.count(len(base)) == 9, scores
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer key-C"}).status_code == 401


def test_keyless_requests_share_nothing_with_the_flag_off(mistral_dir):
    engine, server = start(mistral_dir, share_prefix_cache=False)
    base = engine.tokenizer.encode("My PIN is", add_bos=True)
    with server as url, httpx.Client(base_url=url, timeout=60) as http:
        cached_tokens(http, base + SECRET_PIN)
        assert cached_tokens(http, base + SECRET_PIN[:2] + [FILLER]) == 0
        assert set(guess_next_digit(http, base + SECRET_PIN, base)) == {0}


def test_keyless_requests_share_the_cache_by_default(mistral_dir):
    """The documented default without keys: one person's server, one shared cache."""
    engine, server = start(mistral_dir)
    base = engine.tokenizer.encode("My PIN is", add_bos=True)
    with server as url, httpx.Client(base_url=url, timeout=60) as http:
        cached_tokens(http, base + SECRET_PIN)
        assert cached_tokens(http, base + SECRET_PIN[:2] + [FILLER]) == len(base) + 2


def test_api_key_can_be_repeated_and_sharing_turned_off_on_the_command_line():
    import argparse

    from mistol.commands.serve import register

    sub = argparse.ArgumentParser().add_subparsers(dest="command")
    register(sub)
    args = sub.choices["serve"].parse_args(["--model", "m", "--api-key", "a", "--api-key", "b"])
    assert args.api_key == ["a", "b"] and args.share_prefix_cache is True
    args = sub.choices["serve"].parse_args(["--model", "m", "--no-shared-prefix-cache"])
    assert args.share_prefix_cache is False
