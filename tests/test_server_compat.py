"""`mistol serve` as the clients written for local servers (llama.cpp's, LM Studio's) expect it:
a base URL without /v1, any model name, `system_fingerprint`, contradictory fields refused,
CORS for web pages, a server-wide max_tokens default. A real server on a loopback port, the
official `openai` client, and httpx for what a browser sends. No mocks."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from helpers import LoopbackServer  # noqa: E402
from mistol.engine import Engine  # noqa: E402
from mistol.errors import MistolError  # noqa: E402

KEY = "sk-compat-key"
MODEL = "tiny-hermes"
CONTEXT = 1024  # above the sliding window plus a prefill chunk (see Session: its cache is no bigger)
ORIGIN = "https://app.example.com"
DEFAULT_MAX_TOKENS = 3
HI = [{"role": "user", "content": "hi"}]


def start(mistral_dir, **options):
    from mistol.server import ServerOptions, create_app

    engine = Engine.load(mistral_dir, dtype="f32")
    return create_app(engine, ServerOptions(model_name=MODEL, api_key=KEY, max_context=CONTEXT, **options))


@pytest.fixture(scope="module")
def server(mistral_dir):
    app = start(mistral_dir, cors_origins=[ORIGIN], max_tokens_default=DEFAULT_MAX_TOKENS)
    with LoopbackServer(app) as url:
        http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        yield SimpleNamespace(
            url=url, http=http,
            v1=openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60),
            root=openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60),
        )
        http.close()


@pytest.fixture(scope="module")
def strict(mistral_dir):
    with LoopbackServer(start(mistral_dir, strict_model=True)) as url:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
            yield SimpleNamespace(url=url, http=http)


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.split("\n\n") if line.startswith("data: {")]


# -- 1: a base URL with or without /v1 ------------------------------------------------------
@pytest.mark.parametrize("base", ["v1", "root"])
def test_the_openai_client_works_with_and_without_v1(server, base):
    client = getattr(server, base)
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    r = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3, temperature=0).choices[0].message.content


def test_root_aliases_need_the_key_too(server):
    for method, path in [("GET", "/models"), ("POST", "/chat/completions")]:
        r = httpx.request(method, server.url + path, json={"messages": HI}, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_root_completions_is_not_an_alias(server):
    """/completions is llama.cpp's own API, with other fields: it is not taken for OpenAI's."""
    r = server.http.post("/completions", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


# -- 2: any model name, or none ------------------------------------------------------------
def test_any_model_name_is_answered_by_the_served_model(server):
    r = server.root.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=2, temperature=0)
    assert r.model == MODEL
    c = server.v1.completions.create(model="llama-3-70b", prompt="hi", max_tokens=2, temperature=0)
    assert c.model == MODEL


@pytest.mark.parametrize("path,body", [
    ("/v1/chat/completions", {"messages": HI, "max_tokens": 2}),
    ("/chat/completions", {"messages": HI, "max_tokens": 2, "model": ""}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
])
def test_a_request_without_model_is_answered(server, path, body):
    r = server.http.post(path, json=body)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == MODEL and r.json()["choices"]


def test_a_model_that_is_not_a_string_is_still_refused(server):
    r = server.http.post("/v1/chat/completions", json={"model": 5, "messages": HI})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


@pytest.mark.parametrize("body,status", [
    ({"messages": HI}, 400),
    ({"model": "gpt-4o", "messages": HI}, 404),
])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat/completions"])
def test_strict_model_refuses_a_missing_or_unknown_model(strict, path, body, status):
    r = strict.http.post(path, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == "model"
    assert strict.http.post(path, json={"model": MODEL, "messages": HI, "max_tokens": 2}).status_code == 200


def test_a_card_is_only_for_the_served_model(server):
    assert server.http.get("/v1/models/gpt-4o").status_code == 404
    assert server.http.get(f"/models/{MODEL}").json()["id"] == MODEL


# -- 3: system_fingerprint --------------------------------------------------------------------
def test_system_fingerprint_in_every_response_and_chunk(server):
    chat = server.v1.chat.completions.create(model=MODEL, messages=HI, max_tokens=2, temperature=0)
    fingerprint = chat.system_fingerprint
    assert fingerprint and fingerprint.startswith("mistol-")
    text = server.v1.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=0)
    assert text.system_fingerprint == fingerprint
    for path, body in [("/v1/chat/completions", {"messages": HI}), ("/v1/completions", {"prompt": "hi"})]:
        r = server.http.post(path, json={**body, "max_tokens": 2, "stream": True,
                                         "stream_options": {"include_usage": True}})
        events = sse_events(r.text)
        assert len(events) >= 3 and r.text.rstrip().endswith("data: [DONE]")
        assert [e["system_fingerprint"] for e in events] == [fingerprint] * len(events)


def test_the_fingerprint_names_the_served_model(mistral_dir, server):
    other = start(mistral_dir, strict_model=False)  # same weights, same name: same fingerprint
    renamed = Engine.load(mistral_dir, dtype="f32")
    from mistol.server import ServerOptions, create_app

    mine = server.v1.chat.completions.create(model=MODEL, messages=HI, max_tokens=1).system_fingerprint
    assert other.state.server.fingerprint == mine
    assert create_app(renamed, ServerOptions(model_name="another")).state.server.fingerprint != mine


# -- 5: contradictory fields --------------------------------------------------------------------
def test_add_generation_prompt_with_continue_final_message_is_refused(server):
    messages = HI + [{"role": "assistant", "content": "Hello"}]
    r = server.http.post("/v1/chat/completions", json={
        "model": MODEL, "messages": messages, "add_generation_prompt": True, "continue_final_message": True})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "continue_final_message" and set(error) == {"message", "type", "param", "code"}
    assert "add_generation_prompt" in error["message"] and "continue_final_message" in error["message"]
    # each alone (continue_final_message with the default add_generation_prompt) is still answered
    for extra in [{"continue_final_message": True}, {"add_generation_prompt": False, "continue_final_message": True},
                  {"add_generation_prompt": True}]:
        ok = server.http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2, **extra})
        assert ok.status_code == 200, (extra, ok.text)


# -- 7: CORS ------------------------------------------------------------------------------------
def preflight(url: str, origin: str, path: str = "/v1/chat/completions") -> httpx.Response:
    """What a browser sends before a cross-origin POST with a JSON body and a key."""
    return httpx.options(url + path, timeout=30, headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat/completions", "/v1/models"])
def test_a_listed_origin_passes_the_preflight_and_reads_the_reply(server, path):
    r = preflight(server.url, ORIGIN, path)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    answer = server.http.post("/v1/chat/completions", headers={"Origin": ORIGIN},
                              json={"messages": HI, "max_tokens": 2})
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == ORIGIN


def test_another_origin_is_not_let_in(server):
    r = preflight(server.url, "https://evil.example.net")
    assert "access-control-allow-origin" not in r.headers and r.status_code >= 400
    answer = server.http.post("/v1/chat/completions", headers={"Origin": "https://evil.example.net"},
                              json={"messages": HI, "max_tokens": 2})
    assert "access-control-allow-origin" not in answer.headers


def test_the_preflight_carries_no_key_but_the_request_still_needs_one(server):
    assert preflight(server.url, ORIGIN).status_code == 200
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Origin": ORIGIN}, json={"messages": HI}, timeout=30)
    assert r.status_code == 401


def test_without_cors_origins_no_page_is_let_in(strict):
    r = preflight(strict.url, ORIGIN)
    assert r.status_code == 405 and "access-control-allow-origin" not in r.headers
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_any_origin_needs_an_api_key(mistral_dir, capsys, monkeypatch):
    from mistol.cli import main

    monkeypatch.delenv("MISTOL_API_KEY", raising=False)  # a key from the environment would allow it
    from mistol.server import ServerOptions, create_app

    engine = Engine.load(mistral_dir, dtype="f32")
    with pytest.raises(MistolError, match="--api-key"):
        create_app(engine, ServerOptions(cors_origins=["*"]))
    assert create_app(engine, ServerOptions(api_key=KEY, cors_origins=["*"]))  # with a key it is allowed
    assert main(["serve", "--model", str(mistral_dir), "--cors-origins", "*"]) == 1  # refused before loading
    err = capsys.readouterr().err.strip()
    assert "--cors-origins" in err and "--api-key" in err and len(err.splitlines()) == 1


def test_any_origin_with_a_key(mistral_dir):
    with LoopbackServer(start(mistral_dir, cors_origins=["*"])) as url:
        r = preflight(url, "https://anything.example.org")
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] in ("*", "https://anything.example.org")


# -- 10: --max-tokens-default --------------------------------------------------------------------
def test_max_tokens_default_bounds_a_request_without_max_tokens(server):
    r = server.http.post("/v1/completions", json={"prompt": "hi", "ignore_eos": True, "temperature": 0})
    assert r.status_code == 200
    assert r.json()["usage"]["completion_tokens"] == DEFAULT_MAX_TOKENS
    assert r.json()["choices"][0]["finish_reason"] == "length"
    # a request's own max_tokens wins, above the default as below it
    r = server.http.post("/v1/completions", json={"prompt": "hi", "ignore_eos": True, "max_tokens": 5})
    assert r.json()["usage"]["completion_tokens"] == 5


def test_max_tokens_default_is_cut_to_what_the_context_leaves(server):
    prompt = [1] * (CONTEXT - 2)
    r = server.http.post("/v1/completions", json={"prompt": prompt, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def test_max_tokens_default_must_be_positive(mistral_dir, capsys):
    from mistol.cli import main

    assert main(["serve", "--model", str(mistral_dir), "--max-tokens-default", "0"]) == 1
    assert "--max-tokens-default" in capsys.readouterr().err


# -- 4: n choices --------------------------------------------------------------------------------
@pytest.mark.parametrize("base", ["v1", "root"])
def test_n_greedy_choices_each_equal_the_single_reply(server, base):
    client = getattr(server, base)
    one = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, temperature=0)
    many = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=6, temperature=0, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert [c.message.content for c in many.choices] == [one.choices[0].message.content] * 3
    assert many.usage.prompt_tokens == one.usage.prompt_tokens  # counted once, as OpenAI does
    assert many.usage.completion_tokens == 3 * one.usage.completion_tokens


def test_n_seeded_choices_differ_and_repeat(server):
    ask = dict(model=MODEL, messages=HI, max_tokens=8, temperature=1.5, top_p=1.0, seed=7, n=3,
               extra_body={"top_k": 0, "min_p": 0.0})  # wide sampling: the choices have room to differ
    first = server.v1.chat.completions.create(**ask)
    again = server.v1.chat.completions.create(**ask)
    texts = [c.message.content for c in first.choices]
    assert len(set(texts)) > 1  # each choice samples with its own seed
    assert texts == [c.message.content for c in again.choices]


def test_n_text_completions(server):
    one = server.v1.completions.create(model=MODEL, prompt="The sky", max_tokens=5, temperature=0)
    many = server.v1.completions.create(model=MODEL, prompt="The sky", max_tokens=5, temperature=0, n=2)
    assert [c.index for c in many.choices] == [0, 1]
    assert [c.text for c in many.choices] == [one.choices[0].text] * 2


@pytest.mark.parametrize("chat", [True, False])
def test_n_choices_stream(server, chat):
    ask = dict(model=MODEL, max_tokens=6, temperature=0)
    if chat:
        one = server.v1.chat.completions.create(messages=HI, **ask).choices[0].message.content
        stream = server.v1.chat.completions.create(messages=HI, n=2, stream=True,
                                                   stream_options={"include_usage": True}, **ask)
    else:
        one = server.v1.completions.create(prompt="The sky", **ask).choices[0].text
        stream = server.v1.completions.create(prompt="The sky", n=2, stream=True,
                                              stream_options={"include_usage": True}, **ask)
    texts, finished, usage = {0: "", 1: ""}, {}, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            texts[c.index] += (c.delta.content or "") if chat else c.text
            if c.finish_reason is not None:
                finished[c.index] = c.finish_reason
    assert texts == {0: one, 1: one} and set(finished) == {0, 1}
    assert usage is not None and usage.completion_tokens >= 2


def test_n_beyond_the_limit_is_refused(server):
    r = server.http.post("/v1/chat/completions", json={"messages": HI, "n": 17})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = server.http.post("/v1/completions", json={"prompt": "hi", "n": 2, "best_of": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "best_of"


def test_serving_the_demo_without_code_says_so_at_start_and_in_the_models_list(tmp_path):
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "mistol", "serve", "--model", "demo", "--port", str(port)],
                              stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not any("note:" in line for line in lines):
            line = server.stderr.readline()
            assert line, "".join(lines)
            lines.append(line)
        note = next(line for line in lines if "note:" in line)
        assert "--allow-code" in note
        deadline = time.monotonic() + 60
        while True:
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert "--allow-code" in models["data"][0]["notice"]
    finally:
        server.terminate()
        server.wait(timeout=30)
