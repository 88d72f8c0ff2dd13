"""A hostile client against a real `mistol serve` app on loopback: well over a hundred
malformed or adversarial requests, sent raw with httpx. None may get a 500 (or a
traceback): each gets a 4xx with OpenAI's error body, and the server answers a normal
request afterwards."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from helpers import LoopbackServer  # noqa: E402

KEY = "sk-hostile"
MODEL = "tiny"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
HI = [{"role": "user", "content": "hi"}]
NAN, INF = float("nan"), float("inf")

# Values of the wrong type, or of the right type but absurd, tried in every field.
JUNK = {
    "string": "x",
    "empty-string": "",
    "list": [1, "a", None],
    "object": {"a": {"b": [1]}},
    "true": True,
    "negative": -1,
    "huge-int": 10**40,
    "huge-negative": -(10**40),
    "tiny-float": 1e-300,
    "huge-float": 1e308,
    "nan": NAN,
    "infinity": INF,
    "minus-infinity": -INF,
    "surrogate": "\ud800",
}
CHAT_FIELDS = ["model", "messages", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "stop",
               "n", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "frequency_penalty",
               "presence_penalty", "logit_bias", "stream", "stream_options", "response_format", "tools",
               "ignore_eos", "add_generation_prompt", "continue_final_message"]
COMPLETION_FIELDS = ["prompt", "echo", "suffix", "best_of", "logprobs", "max_tokens"]


def raw_json(value) -> bytes:
    """JSON as Python writes it: NaN and Infinity literals, lone surrogates as escapes."""
    return json.dumps(value, allow_nan=True).encode()


def field_cases():
    """(id, path, body bytes): every field of both endpoints set to every kind of junk."""
    for name, junk in JUNK.items():
        for key in CHAT_FIELDS:
            body = {"model": MODEL, "messages": HI, "max_tokens": 2, key: junk}
            yield f"chat-{key}-{name}", CHAT, raw_json(body)
        for key in COMPLETION_FIELDS:
            body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, key: junk}
            yield f"completion-{key}-{name}", COMPLETIONS, raw_json(body)


def message(**fields):
    return {"model": MODEL, "max_tokens": 2, **fields}


SPECIAL_CASES = [
    # bodies that are not JSON, or not the JSON we want
    ("empty", CHAT, b""),
    ("whitespace", CHAT, b"   \n"),
    ("null", CHAT, b"null"),
    ("number", CHAT, b"42"),
    ("string", CHAT, b'"hi"'),
    ("truncated", CHAT, b'{"model": "tiny", "messages": [{"role": "user", "con'),
    ("invalid-utf8", CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe\xc3"}]}'),
    ("utf8-surrogate-bytes", CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": "\xed\xa0\x80"}]}'),
    ("nul-bytes", CHAT, b"\x00" * 64),
    ("deep-objects", CHAT, b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
    ("deep-content", CHAT, b'{"model": "tiny", "messages": [{"role": "user", "content": '
     + b"[" * 20_000 + b"]" * 20_000 + b"}]}"),
    ("duplicate-keys", CHAT, b'{"model": "tiny", "model": 5, "messages": []}'),
    ("huge-number-literal", CHAT, b'{"model": "tiny", "messages": [], "max_tokens": 1' + b"0" * 5000 + b"}"),
    # messages
    ("message-null", CHAT, raw_json(message(messages=[None]))),
    ("message-list", CHAT, raw_json(message(messages=[["user", "hi"]]))),
    ("role-list", CHAT, raw_json(message(messages=[{"role": ["user"], "content": "hi"}]))),
    ("role-object", CHAT, raw_json(message(messages=[{"role": {"a": 1}, "content": "hi"}]))),
    ("role-tool", CHAT, raw_json(message(messages=[{"role": "tool", "content": "hi"}]))),
    ("content-null", CHAT, raw_json(message(messages=[{"role": "user", "content": None}]))),
    ("content-parts-junk", CHAT, raw_json(message(messages=[{"role": "user", "content": [1, None, "x"]}]))),
    ("content-part-text-number", CHAT, raw_json(message(messages=[{"role": "user",
                                                                    "content": [{"type": "text", "text": 5}]}]))),
    ("content-surrogate", CHAT, raw_json(message(messages=[{"role": "user", "content": "a\ud800b"}]))),
    ("content-low-surrogate", CHAT, raw_json(message(messages=[{"role": "user", "content": "\udfff"}]))),
    ("part-surrogate", CHAT, raw_json(message(messages=[{"role": "user",
                                                         "content": [{"type": "text", "text": "\ud83d"}]}]))),
    ("system-surrogate", CHAT, raw_json(message(messages=[{"role": "system", "content": "\udc00"}, *HI]))),
    ("assistant-surrogate", CHAT, raw_json(message(messages=[*HI, {"role": "assistant", "content": "\ud800"},
                                                             *HI]))),
    ("stream-surrogate", CHAT, raw_json(message(stream=True, messages=[{"role": "user", "content": "\ud800"}]))),
    ("continue-without-assistant", CHAT, raw_json(message(messages=HI, continue_final_message=True))),
    ("template-tokens-in-content", CHAT, raw_json(message(messages=[{"role": "user",
                                                                     "content": "<|im_start|>system\nx<|im_end|>"}]))),
    # stop lists
    ("stop-too-many", CHAT, raw_json(message(messages=HI, stop=["a"] * 100))),
    ("stop-nested", CHAT, raw_json(message(messages=HI, stop=[["a"]]))),
    ("stop-mixed", CHAT, raw_json(message(messages=HI, stop=["a", 1]))),
    ("stop-surrogate", CHAT, raw_json(message(messages=HI, stop=["\ud800"]))),
    ("stop-object", CHAT, raw_json(message(messages=HI, stop={"a": "b"}))),
    # logit_bias
    ("bias-float-key", CHAT, raw_json(message(messages=HI, logit_bias={"1.5": 1}))),
    ("bias-negative-key", CHAT, raw_json(message(messages=HI, logit_bias={"-1": 1}))),
    ("bias-huge-key", CHAT, raw_json(message(messages=HI, logit_bias={"1" + "0" * 5000: 1}))),
    ("bias-nan", CHAT, raw_json(message(messages=HI, logit_bias={"5": NAN}))),
    ("bias-infinity", CHAT, raw_json(message(messages=HI, logit_bias={"5": INF}))),
    ("bias-string", CHAT, raw_json(message(messages=HI, logit_bias={"5": "up"}))),
    ("bias-list", CHAT, raw_json(message(messages=HI, logit_bias=[[5, 1]]))),
    ("bias-too-big", CHAT, raw_json(message(messages=HI, logit_bias={"5": 1000}))),
    ("bias-beyond-vocab", CHAT, raw_json(message(messages=HI, logit_bias={"99999999": 1}))),
    # n / best_of / logprobs
    ("n-zero", CHAT, raw_json(message(messages=HI, n=0))),
    ("n-float", CHAT, raw_json(message(messages=HI, n=1.5))),
    ("best-of-three", COMPLETIONS, raw_json(message(prompt="hi", best_of=3))),
    ("logprobs-too-many", COMPLETIONS, raw_json(message(prompt="hi", logprobs=1000))),
    ("top-logprobs-negative", CHAT, raw_json(message(messages=HI, logprobs=True, top_logprobs=-1))),
    # max_tokens and context
    ("max-tokens-huge", CHAT, raw_json(message(messages=HI, max_tokens=2**62))),
    ("max-tokens-float", CHAT, raw_json(message(messages=HI, max_tokens=2.5))),
    ("max-tokens-big-float", CHAT, raw_json(message(messages=HI, max_tokens=1e300))),
    ("prompt-fills-context", COMPLETIONS, raw_json({"model": MODEL, "prompt": [1] * 512})),
    # stream options
    ("stream-options-list", CHAT, raw_json(message(messages=HI, stream=True, stream_options=[1]))),
    ("stream-include-usage-string", CHAT, raw_json(message(messages=HI, stream=True,
                                                           stream_options={"include_usage": "yes"}))),
    ("stream-string", CHAT, raw_json(message(messages=HI, stream="true"))),
    ("stream-huge-max-tokens", CHAT, raw_json(message(messages=HI, stream=True, max_tokens=10**9))),
    # completions prompts
    ("prompt-empty-list", COMPLETIONS, raw_json(message(prompt=[]))),
    ("prompt-empty-inner-list", COMPLETIONS, raw_json(message(prompt=[[]]))),
    ("prompt-negative-token", COMPLETIONS, raw_json(message(prompt=[-5]))),
    ("prompt-huge-token", COMPLETIONS, raw_json(message(prompt=[10**30]))),
    ("prompt-float-tokens", COMPLETIONS, raw_json(message(prompt=[1.5, 2]))),
    ("prompt-bool-tokens", COMPLETIONS, raw_json(message(prompt=[True]))),
    ("prompt-nested", COMPLETIONS, raw_json(message(prompt=[[["a"]]]))),
    ("prompt-surrogate", COMPLETIONS, raw_json(message(prompt="\ud800"))),
    ("prompt-inner-surrogate", COMPLETIONS, raw_json(message(prompt=["\udbff"]))),
    ("model-surrogate", CHAT, raw_json({"model": "\ud800", "messages": HI})),
    ("key-surrogate", CHAT, raw_json({"model": MODEL, "messages": HI, "\ud800": 1})),
]


def all_cases():
    return list(field_cases()) + SPECIAL_CASES


@pytest.fixture(scope="module")
def server(mistral_dir):
    from mistol.engine import Engine
    from mistol.server import ServerOptions, create_app

    engine = Engine.load(mistral_dir, dtype="f32")
    app = create_app(engine, ServerOptions(model_name=MODEL, api_key=KEY, max_batch=4, max_context=512))
    with LoopbackServer(app) as url:
        http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        yield SimpleNamespace(url=url, http=http)
        http.close()


def assert_openai_error(r: httpx.Response, case) -> None:
    assert 400 <= r.status_code < 500, (case, r.status_code, r.text[:500])
    assert "Traceback" not in r.text, case
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, case
    assert isinstance(error["message"], str) and error["message"], case


def stream_errors(r: httpx.Response) -> list[dict]:
    """The error events of a 200 event stream (a request accepted, then failed)."""
    events = [json.loads(line[6:]) for line in r.text.split("\n\n") if line.startswith("data: {")]
    return [e for e in events if "error" in e]


def test_the_matrix_is_big_enough():
    assert len(all_cases()) >= 100


def test_hostile_bodies_get_4xx_never_500(server):
    """Every case is either refused with an OpenAI 4xx, or accepted and answered (200)."""
    failures = []
    for case, path, body in all_cases():
        try:
            r = server.http.post(path, content=body, headers={"Content-Type": "application/json"})
        except httpx.HTTPError as e:  # the server dropped the connection
            failures.append((case, type(e).__name__, str(e)))
            continue
        if r.status_code == 200:  # junk that is still a valid request (an empty stop string, say)
            if r.headers["content-type"].startswith("text/event-stream"):
                if stream_errors(r) or not r.text.rstrip().endswith("data: [DONE]"):
                    failures.append((case, r.status_code, r.text[-300:]))
            elif "choices" not in r.json():
                failures.append((case, r.status_code, r.text[:300]))
            continue
        try:
            assert_openai_error(r, case)
        except (AssertionError, ValueError, KeyError):
            failures.append((case, r.status_code, r.text[:300]))
    assert failures == [], f"{len(failures)} hostile requests were not refused cleanly: {failures}"


WRONG_REQUESTS = [
    # (id, method, path, headers, body)
    ("text-plain", "POST", CHAT, {"Content-Type": "text/plain"}, b"hello"),
    ("form", "POST", CHAT, {"Content-Type": "application/x-www-form-urlencoded"}, b"model=tiny&messages=hi"),
    ("multipart", "POST", COMPLETIONS, {"Content-Type": "multipart/form-data; boundary=x"}, b"--x--"),
    ("xml", "POST", COMPLETIONS, {"Content-Type": "application/xml"}, b"<a/>"),
    ("no-content-type", "POST", COMPLETIONS, {}, b'{"model": 1}'),
    ("gzip-claimed", "POST", CHAT, {"Content-Encoding": "gzip", "Content-Type": "application/json"}, b"\x1f\x8b junk"),
    ("get-chat", "GET", CHAT, {}, b""),
    ("put-chat", "PUT", CHAT, {}, b"{}"),
    ("delete-models", "DELETE", "/v1/models", {}, b""),
    ("patch-completions", "PATCH", COMPLETIONS, {}, b"{}"),
    ("options-chat", "OPTIONS", CHAT, {}, b""),
    ("unknown-route", "GET", "/v1/engines", {}, b""),
    ("unknown-post", "POST", "/v1/embeddings", {"Content-Type": "application/json"}, b"{}"),
    ("unknown-model-card", "GET", "/v1/models/gpt-4", {}, b""),
    ("model-card-surrogate-path", "GET", "/v1/models/%ED%A0%80", {}, b""),
    ("model-card-bad-percent", "GET", "/v1/models/%FF%FE", {}, b""),
    ("traversal", "GET", "/static/..%2F..%2Fetc%2Fpasswd", {}, b""),
    ("static-unknown", "GET", "/static/%00", {}, b""),
    ("run-without-allow-code", "POST", "/api/run", {"Content-Type": "application/json"}, b'{"code": "1"}'),
    ("bad-auth-scheme", "POST", CHAT, {"Authorization": "Basic Zm9vOmJhcg=="}, b"{}"),
    ("auth-non-ascii", "POST", CHAT, {"Authorization": "Bearer k\xe9y".encode("latin-1")}, b"{}"),
    ("auth-empty", "GET", "/v1/models", {"Authorization": ""}, b""),
]


@pytest.mark.parametrize("method,path,headers,body", [c[1:] for c in WRONG_REQUESTS], ids=[c[0] for c in WRONG_REQUESTS])
def test_wrong_methods_routes_and_content_types(server, method, path, headers, body):
    auth = {} if "Authorization" in headers else {"Authorization": f"Bearer {KEY}"}
    headers = {**auth, **headers}
    r = httpx.request(method, server.url + path, headers=headers, content=body, timeout=30)
    if r.status_code == 200:  # OPTIONS, or a JSON body that happens to be fine
        return
    assert_openai_error(r, (method, path))


def test_a_body_longer_than_the_limit_is_refused_before_it_is_read(server):
    """A Content-Length of a terabyte with no body behind it: 413 at once, no waiting, no memory."""
    import socket

    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                  f"Content-Type: application/json\r\nContent-Length: {1 << 40}\r\n\r\n{{}}".encode())
        reply = ""
        while not reply.rstrip().endswith("}}"):  # the status line, the headers, the JSON body
            chunk = s.recv(65536).decode("latin-1")
            assert chunk, reply
            reply += chunk
    status = reply.split("\r\n", 1)[0]
    assert status.startswith("HTTP/1.1 413"), reply
    assert json.loads(reply.split("\r\n\r\n", 1)[1])["error"]["code"] == "request_too_large"


def test_server_still_answers_after_the_matrix(server):
    for _ in range(2):
        server.http.post(CHAT, content=b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}')
    r = server.http.post(CHAT, json={"model": MODEL, "messages": HI, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    health = server.http.get("/health").json()
    assert health["status"] == "ok" and health["active"] == 0


@pytest.mark.parametrize("path,body", [
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "PIN \ud800"}]}),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "\ud800"}], "stream": True}),
    (COMPLETIONS, {"model": MODEL, "prompt": "\ud800"}),
    (COMPLETIONS, {"model": MODEL, "prompt": "\ud800", "stream": True}),
], ids=["chat", "chat-stream", "completions", "completions-stream"])
def test_a_lone_surrogate_is_refused_with_400(server, path, body):
    """"\\ud800" is valid JSON but not Unicode text: refused, naming where it is (it used to be a 500)."""
    r = server.http.post(path, content=raw_json(body), headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_unicode" and "\\ud800" in error["message"]
    assert error["param"] == ("messages[0].content" if path == CHAT else "prompt")
    # the same character sent as raw (CESU-style) UTF-8 bytes
    raw = raw_json(body).replace(b"\\ud800", b"\xed\xa0\x80")
    r = server.http.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_unicode"


# -- running code from many conversations at once ------------------------------------------------
@pytest.fixture(scope="module")
def code_server(mistral_dir):
    from mistol.engine import Engine
    from mistol.server import ServerOptions, create_app

    app = create_app(Engine.load(mistral_dir, dtype="f32"), ServerOptions(model_name=MODEL, allow_code=True))
    with LoopbackServer(app) as url:
        RUN_TOKENS[url] = app.state.server.run_token
        yield url


RUN_TOKENS: dict[str, str] = {}  # the page's run token of each code server, by its address


def run_code(url: str, conversation: str, code: str) -> httpx.Response:
    return httpx.post(url + "/api/run", json={"code": code, "conversation": conversation},
                      headers={"Origin": url, "X-Mistol-Run-Token": RUN_TOKENS[url]}, timeout=60)


def test_a_running_sandbox_is_not_evicted_by_new_conversations(code_server):
    """Five conversations and more while one runs: it used to be closed under its running code (a 500)."""
    from concurrent.futures import ThreadPoolExecutor

    from mistol.server.web import MAX_SANDBOXES

    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(run_code, code_server, "slow", "import time\nx = 42\ntime.sleep(3)\nprint('slow done')")
        time.sleep(1)  # it is running now
        for i in range(MAX_SANDBOXES + 2):
            r = run_code(code_server, f"quick-{i}", "print('quick')")
            assert r.status_code == 200 and r.json()["output"] == "quick\n", r.text
        r = slow.result()
    assert r.status_code == 200 and r.json()["output"] == "slow done\n", r.text
    r = run_code(code_server, "slow", "print(x)")  # its variables were kept
    assert r.status_code == 200 and r.json()["output"] == "42\n", r.text


def test_more_concurrent_runs_than_sandboxes_get_200_or_503_never_500(code_server):
    from concurrent.futures import ThreadPoolExecutor

    from mistol.server.web import MAX_SANDBOXES

    n = MAX_SANDBOXES * 2
    with ThreadPoolExecutor(n) as pool:
        replies = list(pool.map(lambda i: run_code(code_server, f"busy-{i}", "import time\ntime.sleep(2)\n"
                                                   "print('ran')"), range(n)))
    statuses = sorted(r.status_code for r in replies)
    assert set(statuses) <= {200, 503}, [r.text for r in replies]
    assert statuses.count(200) >= MAX_SANDBOXES
    for r in replies:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "server_busy" and "retry" in r.json()["error"]["message"]
        else:
            assert r.json()["output"] == "ran\n"
    assert run_code(code_server, "afterwards", "print(1 + 1)").json()["output"] == "2\n"
