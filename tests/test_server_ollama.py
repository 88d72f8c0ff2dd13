"""`mistol serve` through ollama's API, with the official `ollama` Python client: chat and
generate (streamed NDJSON and not), embed, tags, show, ps and version, and bad requests
answered with ollama's `{"error": ...}` and a 4xx. References: the same request through the
official `openai` client (the two APIs must give the same text and counts) and transformers'
chat template and tokenizer for the prompts. A real server on a loopback port; no mocks."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
ollama = pytest.importorskip("ollama")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
transformers = pytest.importorskip("transformers")

from helpers import LoopbackServer  # noqa: E402
from mistol.engine import Engine  # noqa: E402

KEY = "sk-ollama-key"
MODEL = "tiny-hermes"
CONTEXT = 1024
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
GREEDY = {"temperature": 0, "num_predict": 12}


def start(mistral_dir, **options):
    from mistol.server import ServerOptions, create_app

    engine = Engine.load(mistral_dir, dtype="f32")
    return create_app(engine, ServerOptions(model_name=MODEL, api_key=KEY, max_context=CONTEXT, **options))


@pytest.fixture(scope="module")
def server(mistral_dir):
    with LoopbackServer(start(mistral_dir)) as url:
        headers = {"Authorization": f"Bearer {KEY}"}
        http = httpx.Client(base_url=url, headers=headers, timeout=60)
        yield SimpleNamespace(
            url=url, http=http,
            client=ollama.Client(host=url, headers=headers, timeout=60),
            openai=openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60),
        )
        http.close()


@pytest.fixture(scope="module")
def hf_tokenizer(mistral_dir):
    return transformers.AutoTokenizer.from_pretrained(mistral_dir)


def template_ids(hf_tokenizer, messages) -> list[int]:
    """The prompt transformers renders for `messages`, tokenized as a prompt is (BOS first)."""
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return hf_tokenizer(text).input_ids


def openai_reply(server, messages, max_tokens=12, **extra):
    r = server.openai.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0,
                                              **extra)
    return r.choices[0].message.content, r.choices[0].finish_reason, r.usage


# -- /api/chat ------------------------------------------------------------------------------------
def test_chat_gives_what_the_openai_api_gives(server, hf_tokenizer):
    r = server.client.chat(model=MODEL, messages=MESSAGES, options=GREEDY)
    text, finish, usage = openai_reply(server, MESSAGES)
    assert r.done is True and r.model == MODEL and r.message.role == "assistant"
    assert r.message.content == text and r.done_reason == finish
    assert r.eval_count == usage.completion_tokens
    assert r.prompt_eval_count == len(template_ids(hf_tokenizer, MESSAGES))
    assert r.created_at.endswith("Z") and r.load_duration == 0
    assert r.total_duration >= r.prompt_eval_duration + r.eval_duration > 0


def test_chat_streams_pieces_then_a_done_record(server):
    whole = server.client.chat(model=MODEL, messages=MESSAGES, options=GREEDY)
    parts = list(server.client.chat(model=MODEL, messages=MESSAGES, options=GREEDY, stream=True))
    assert len(parts) > 2
    assert all(p.done is False and p.done_reason is None and p.eval_count is None for p in parts[:-1])
    last = parts[-1]
    assert last.done is True and last.done_reason == whole.done_reason and last.message.content == ""
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert (last.eval_count, last.prompt_eval_count) == (whole.eval_count, whole.prompt_eval_count)


def test_stream_is_the_default_and_is_ndjson(server):
    r = server.http.post("/api/chat", json={"model": MODEL, "messages": MESSAGES, "options": GREEDY})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    records = [json.loads(line) for line in r.text.splitlines()]
    assert r.text.endswith("\n") and len(records) > 2
    assert [rec["done"] for rec in records] == [False] * (len(records) - 1) + [True]
    assert set(records[0]) == {"model", "created_at", "message", "done"}
    assert {"done_reason", "total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
            "eval_count", "eval_duration"} <= set(records[-1])


def test_chat_options_are_honoured(server):
    text = server.client.chat(model=MODEL, messages=MESSAGES, options={"temperature": 0, "num_predict": 30})
    content = text.message.content
    assert len(content) > 8
    stop = content[len(content) // 2 : len(content) // 2 + 3]
    cut = server.client.chat(model=MODEL, messages=MESSAGES, options={"temperature": 0, "num_predict": 30,
                                                                       "stop": [stop]})
    assert cut.message.content == content[: content.find(stop)] and cut.done_reason == "stop"
    short = server.client.chat(model=MODEL, messages=MESSAGES, options={"temperature": 0, "num_predict": 3})
    assert short.eval_count == 3 and short.done_reason == "length"
    sampled = {"temperature": 1.0, "top_p": 0.9, "top_k": 20, "min_p": 0.0, "seed": 1234, "num_predict": 16,
               "repeat_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": 0.2}
    first = server.client.chat(model=MODEL, messages=MESSAGES, options=sampled)
    assert server.client.chat(model=MODEL, messages=MESSAGES, options=sampled).message.content == \
        first.message.content
    # the same sampling through the OpenAI route (temperature, seed and penalties mapped one to one)
    r = server.openai.chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=16, temperature=1.0, top_p=0.9, seed=1234,
        presence_penalty=0.5, frequency_penalty=0.2, extra_body={"top_k": 20, "min_p": 0.0, "repetition_penalty": 1.1})
    assert first.message.content == r.choices[0].message.content


def test_hints_are_ignored_and_empty_messages_load_the_model(server):
    r = server.client.chat(model=MODEL, messages=MESSAGES, keep_alive="5m",
                           options={**GREEDY, "num_ctx": 4096, "num_thread": 2, "num_gpu": 0, "mirostat": 0})
    assert r.message.content == server.client.chat(model=MODEL, messages=MESSAGES, options=GREEDY).message.content
    loaded = server.client.chat(model=MODEL, messages=[])
    assert loaded.done is True and loaded.done_reason == "load" and loaded.message.content == ""


def test_any_model_name_is_answered_by_the_served_model(server):
    r = server.client.chat(model="llama3.2:latest", messages=MESSAGES, options=GREEDY)
    assert r.model == MODEL and r.done


# -- /api/generate ----------------------------------------------------------------------------------
def test_generate_is_a_one_message_chat_and_returns_its_context(server, hf_tokenizer):
    prompt = "Name a colour."
    r = server.client.generate(model=MODEL, prompt=prompt, system="You are terse.", options=GREEDY)
    text, finish, usage = openai_reply(server, MESSAGES)
    assert r.response == text and r.done_reason == finish and r.eval_count == usage.completion_tokens
    prompt_ids = template_ids(hf_tokenizer, MESSAGES)
    assert r.prompt_eval_count == len(prompt_ids)
    assert r.context[: len(prompt_ids)] == prompt_ids  # the conversation so far, to send back
    assert hf_tokenizer.decode(r.context[len(prompt_ids):]) == text

    parts = list(server.client.generate(model=MODEL, prompt=prompt, system="You are terse.", options=GREEDY,
                                        stream=True))
    assert "".join(p.response for p in parts) == text and parts[-1].done and parts[-1].context == r.context
    assert all(not p.done and p.context is None for p in parts[:-1])

    # going on from the context: the new turn is appended to it, without a second BOS
    follow = server.client.generate(model=MODEL, prompt="Another.", context=r.context, options=GREEDY)
    turn = template_ids(hf_tokenizer, [{"role": "user", "content": "Another."}])
    assert turn[0] == hf_tokenizer.bos_token_id
    assert follow.prompt_eval_count == len(r.context) + len(turn) - 1
    assert follow.context[: len(r.context)] == r.context


def test_generate_raw_sends_the_prompt_as_written(server, hf_tokenizer):
    prompt = "<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    r = server.client.generate(model=MODEL, prompt=prompt, raw=True, options=GREEDY)
    assert r.prompt_eval_count == len(hf_tokenizer(prompt).input_ids)  # control tokens parsed, BOS first
    text, _, _ = openai_reply(server, [{"role": "user", "content": "Name a colour."}])
    assert r.response == text
    loaded = server.client.generate(model=MODEL, prompt="")
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""


# -- models, embeddings, version ----------------------------------------------------------------------
def test_list_show_ps_and_version(server, mistral_dir):
    config = json.loads((mistral_dir / "config.json").read_text())
    models = server.client.list().models
    assert [m.model for m in models] == [MODEL]
    details = models[0].details
    assert details.family == "mistral" and details.quantization_level == "F32" and details.format == "safetensors"
    parameters = transformers.AutoModelForCausalLM.from_pretrained(mistral_dir).num_parameters()
    assert details.parameter_size == f"{parameters / 1e6:.2f}M"
    assert len(models[0].digest) == 64 and models[0].size > 0
    shown = server.client.show(MODEL)
    assert shown.capabilities == ["completion"] and shown.details.family == "mistral"
    info = shown.modelinfo
    assert info["mistral.context_length"] == CONTEXT
    assert info["mistral.embedding_length"] == config["hidden_size"]
    assert info["mistral.block_count"] == config["num_hidden_layers"]
    assert info["mistral.attention.head_count_kv"] == config["num_key_value_heads"]
    assert info["general.parameter_count"] == parameters
    assert "<|im_start|>" in shown.template
    running = server.client.ps().models
    assert [m.model for m in running] == [MODEL] and running[0].context_length == CONTEXT
    version = server.http.get("/api/version")
    assert version.status_code == 200 and version.json()["version"].count(".") == 2


def test_embed_gives_the_openai_routes_vectors(server):
    r = server.client.embed(model=MODEL, input=["first text", "second"])
    assert len(r.embeddings) == 2 and r.model == MODEL
    ref = server.openai.embeddings.create(model=MODEL, input=["first text", "second"])
    for ours, theirs in zip(r.embeddings, ref.data):
        assert ours == pytest.approx(theirs.embedding, abs=1e-6)
    assert r.prompt_eval_count == ref.usage.prompt_tokens
    long = server.client.embed(model=MODEL, input="word " * (CONTEXT + 50))  # truncated to the context, as ollama does
    assert long.prompt_eval_count == CONTEXT
    with pytest.raises(ollama.ResponseError) as e:
        server.client.embed(model=MODEL, input="word " * (CONTEXT + 50), truncate=False)
    assert e.value.status_code == 400 and "too large" in e.value.error


def test_format_constrains_the_output_to_json_or_a_schema(server):
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 130}},
              "required": ["name", "age"], "additionalProperties": False}
    reply = server.client.chat(model=MODEL, messages=MESSAGES, format=schema, options={"num_predict": 60, "seed": 1})
    assert reply.done_reason == "stop", (reply.done_reason, reply.message.content)
    jsonschema.validate(json.loads(reply.message.content), schema)
    # "json": any object; a random model may write one longer than num_predict, cut there
    free = server.client.generate(model=MODEL, prompt="x", format="json", options={"num_predict": 60, "seed": 2})
    assert free.response.startswith("{")
    if free.done_reason == "stop":
        assert isinstance(json.loads(free.response), dict)


# -- refusals ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("call, words", [
    (lambda c: c.chat(model=MODEL, messages=MESSAGES, format={"type": "nonsense"}), ["format"]),
    (lambda c: c.chat(model=MODEL, messages=MESSAGES, tools=[{"type": "function", "function": {"name": "f"}}]),
     ["tools"]),
    (lambda c: c.chat(model=MODEL, messages=[{"role": "user", "content": "x", "images": ["aGk="]}]), ["images"]),
    (lambda c: c.generate(model=MODEL, prompt="x", images=["aGk="]), ["images"]),
    (lambda c: c.chat(model=MODEL, messages=MESSAGES, think=True), ["think"]),
    (lambda c: c.chat(model=MODEL, messages=MESSAGES, logprobs=True), ["logprobs"]),
    (lambda c: c.generate(model=MODEL, prompt="x", suffix="y"), ["suffix"]),
    (lambda c: c.generate(model=MODEL, prompt="x", template="{{ .Prompt }}"), ["template"]),
    (lambda c: c.chat(model=MODEL, messages=MESSAGES, options={"mirostat": 2}), ["mirostat"]),
    (lambda c: c.chat(model=MODEL, messages=MESSAGES, options={"typical_p": 0.5}), ["typical_p"]),
    (lambda c: c.chat(model=MODEL, messages=MESSAGES, options={"num_predict": 0}), ["num_predict"]),
    (lambda c: c.chat(model=MODEL, messages=MESSAGES, options={"temperature": "hot"}), ["options.temperature"]),
    (lambda c: c.chat(model=MODEL, messages=MESSAGES, options={"top_p": 7}), ["options.top_p"]),
    (lambda c: c.chat(model=MODEL, messages=MESSAGES, options={"seed": 2**70}), ["options.seed"]),
    (lambda c: c.chat(model=MODEL, messages=MESSAGES, options={"stop": [1]}), ["stop"]),
    (lambda c: c.chat(model=MODEL, messages=[{"role": "tool", "content": "42"}]), ["tool"]),
    (lambda c: c.chat(model=MODEL, messages=[{"role": "wizard", "content": "x"}]), ["role"]),
    (lambda c: c.generate(model=MODEL, prompt="x", context=[1, -5]), ["-5", "vocabulary"]),
    (lambda c: c.generate(model=MODEL, prompt="x", context=[2**62]), ["vocabulary"]),
    (lambda c: c.generate(model=MODEL, prompt="x" * 10, options={"num_predict": CONTEXT}),
     ["options.num_predict", "context"]),
    (lambda c: c.embed(model=MODEL, input=[]), ["input"]),
    (lambda c: c.embed(model=MODEL, input="x", dimensions=3), ["dimensions"]),
])
def test_unsupported_or_bad_requests_are_clear_400s(server, call, words):
    with pytest.raises(ollama.ResponseError) as e:
        result = call(server.client)
        list(result) if not hasattr(result, "model_dump") else None
    assert e.value.status_code == 400
    assert isinstance(e.value.error, str) and "Traceback" not in e.value.error
    for word in words:
        assert word in e.value.error, e.value.error


@pytest.mark.parametrize("path, body", [
    ("/api/chat", b'{"model": "m", "messages": ['),
    ("/api/chat", b'[]'),
    ("/api/chat", b'{"messages": []}'),
    ("/api/chat", b'{"model": 5, "messages": []}'),
    ("/api/chat", b'{"model": "m", "messages": "hi"}'),
    ("/api/chat", b'{"model": "m", "messages": [{"role": "user", "content": 5}]}'),
    ("/api/chat", b'{"model": "m", "messages": [], "stream": "yes"}'),
    ("/api/chat", b'{"model": "m", "messages": [], "options": [1]}'),
    ("/api/chat", b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "format": "yaml"}'),
    ("/api/generate", b'{"model": "m", "prompt": 5}'),
    ("/api/generate", b'{"model": "m", "prompt": "x", "raw": "no"}'),
    ("/api/generate", b'{"model": "m", "prompt": "x", "context": "1 2"}'),
    ("/api/generate", b'{"model": "m", "prompt": "x", "options": {"num_predict": 1.5}}'),
    ("/api/show", b'{}'),
    ("/api/show", b'\xff'),
    ("/api/embed", b'{"model": "m", "input": [1, 2]}'),
    ("/api/embed", b'{"model": "m", "input": "x", "truncate": 0}'),
])
def test_malformed_bodies_are_400s_in_ollamas_shape(server, path, body):
    r = server.http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert list(r.json()) == ["error"] and isinstance(r.json()["error"], str) and r.json()["error"]


def test_the_api_key_is_needed(server):
    for call in (lambda c: c.chat(model=MODEL, messages=MESSAGES), lambda c: c.generate(model=MODEL, prompt="x"),
                 lambda c: c.list(), lambda c: c.show(MODEL), lambda c: c.ps(), lambda c: c.embed(MODEL, "x")):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            with pytest.raises(ollama.ResponseError) as e:
                call(ollama.Client(host=server.url, headers=headers))
            assert e.value.status_code == 401 and "API key" in e.value.error


def test_strict_model_names_the_model_and_accepts_latest(mistral_dir):
    with LoopbackServer(start(mistral_dir, strict_model=True)) as url:
        client = ollama.Client(host=url, headers={"Authorization": f"Bearer {KEY}"})
        assert client.chat(model=f"{MODEL}:latest", messages=MESSAGES, options={"num_predict": 2}).done
        with pytest.raises(ollama.ResponseError) as e:
            client.chat(model="llama3.2", messages=MESSAGES)
        assert e.value.status_code == 404 and "llama3.2" in e.value.error


def test_the_chat_pages_routes_are_untouched(server):
    assert server.http.get("/api/config").status_code == 200
    assert server.http.post("/api/run", json={"code": "print(1)"}).status_code == 404  # only with --allow-code


def test_seed_minus_one_is_ollamas_random_seed(server):
    options = {"temperature": 1.0, "seed": -1, "num_predict": 16}
    replies = {server.client.chat(model=MODEL, messages=MESSAGES, options=options).message.content for _ in range(3)}
    assert len(replies) > 1


def test_a_client_that_leaves_frees_its_slot(server):
    cancelled = server.http.get("/health").json()["cancelled"]
    body = {"model": MODEL, "messages": MESSAGES, "stream": False, "options": {"num_predict": 900}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/api/chat", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.3)
    deadline = time.monotonic() + 10
    while server.http.get("/health").json()["cancelled"] == cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    health = server.http.get("/health").json()
    assert health["cancelled"] == cancelled + 1 and health["active"] == 0
