"""`mistol serve`'s llama.cpp utility endpoints (/tokenize, /detokenize, /apply-template,
/metrics) over plain HTTP, and /v1/embeddings with the official `openai` client. References:
transformers' tokenizer and chat template for the same files, transformers' own model for the
hidden states, `prometheus_client`'s parser for the metrics text. A real server on a loopback
port; no mocks."""

from __future__ import annotations

import asyncio
import json
import math
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

from helpers import LoopbackServer  # noqa: E402
from mistol.engine import Engine  # noqa: E402

KEY = "sk-endpoints-key"
MODEL = "tiny-hermes"
CONTEXT = 1024  # above the sliding window (8) plus a prefill chunk
TEXTS = ["Hello world", "What is the capital of France ?", "unicode 媽 and emoji 🤗", "  two  spaces\n\ttab",
         "<|im_start|>user hi<|im_end|>"]
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(mistral_dir):
    from mistol.server import ServerOptions, create_app

    engine = Engine.load(mistral_dir, dtype="f32")
    app = create_app(engine, ServerOptions(model_name=MODEL, api_key=KEY, max_context=CONTEXT))
    with LoopbackServer(app) as url:
        http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        yield SimpleNamespace(
            url=url, http=http, engine=engine,
            v1=openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60),
            root=openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60),
        )
        http.close()


@pytest.fixture(scope="module")
def hf_tokenizer(mistral_dir):
    return transformers.AutoTokenizer.from_pretrained(mistral_dir)


@pytest.fixture(scope="module")
def hf_model(mistral_dir):
    return transformers.AutoModel.from_pretrained(mistral_dir, dtype=torch.float32).eval()


def bad_request(r: httpx.Response, *words: str) -> str:
    """A clear 400 in OpenAI's shape, whose message names what was wrong."""
    assert r.status_code == 400, (r.status_code, r.text)
    message = r.json()["error"]["message"]
    assert message and "\n" not in message and "Traceback" not in message
    for word in words:
        assert word in message, message
    return message


# -- /tokenize, /detokenize ---------------------------------------------------------------------
@pytest.mark.parametrize("text", TEXTS)
def test_tokenize_matches_transformers(server, hf_tokenizer, text):
    r = server.http.post("/tokenize", json={"content": text})
    assert r.status_code == 200 and list(r.json()) == ["tokens"]
    # llama.cpp's defaults: no BOS, special tokens written in the text are parsed
    assert r.json()["tokens"] == hf_tokenizer(text, add_special_tokens=False).input_ids
    with_bos = server.http.post("/tokenize", json={"content": text, "add_special": True}).json()["tokens"]
    assert with_bos == hf_tokenizer(text).input_ids and with_bos[0] == hf_tokenizer.bos_token_id
    plain = server.http.post("/tokenize", json={"content": text, "parse_special": False}).json()["tokens"]
    assert plain == hf_tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids


def test_tokenize_with_pieces_gives_each_tokens_text_or_bytes(server, hf_tokenizer):
    text = "This is a test string with unicode 媽 and emoji 🤗"
    tokens = server.http.post("/tokenize", json={"content": text, "with_pieces": True}).json()["tokens"]
    assert [t["id"] for t in tokens] == hf_tokenizer(text, add_special_tokens=False).input_ids
    for t, hf_piece in zip(tokens, hf_tokenizer.convert_ids_to_tokens([t["id"] for t in tokens])):
        if hf_piece.startswith("<0x"):  # a byte of a character: llama.cpp gives the byte values
            assert t["piece"] == [int(hf_piece[3:5], 16)]
        else:
            assert t["piece"] == hf_piece.replace("\u2581", " ") and t["piece"]
    joined = b"".join(bytes(t["piece"]) if isinstance(t["piece"], list) else t["piece"].encode() for t in tokens)
    assert joined.decode() == " " + text  # SentencePiece's leading space, as llama.cpp's pieces keep it


def test_detokenize_matches_transformers(server, hf_tokenizer):
    for text in TEXTS:
        ids = hf_tokenizer(text).input_ids  # BOS first: special tokens are written out
        r = server.http.post("/detokenize", json={"tokens": ids})
        assert r.status_code == 200 and r.json() == {"content": hf_tokenizer.decode(ids, skip_special_tokens=False)}
    tokens = server.http.post("/tokenize", json={"content": TEXTS[1]}).json()["tokens"]
    assert server.http.post("/detokenize", json={"tokens": tokens}).json()["content"].strip() == TEXTS[1]
    assert server.http.post("/detokenize", json={"tokens": []}).json() == {"content": ""}


@pytest.mark.parametrize("body, words", [
    ({}, ["content"]),
    ({"content": 42}, ["content"]),
    ({"content": ["a", 1]}, ["content"]),
    ({"content": "x", "add_special": "yes"}, ["add_special"]),
    ({"content": "x", "with_pieces": 1}, ["with_pieces"]),
    ({"content": "x", "parse_special": None}, ["parse_special"]),
    ([], ["JSON object"]),
])
def test_tokenize_refuses_bad_input(server, body, words):
    bad_request(server.http.post("/tokenize", json=body), *words)


@pytest.mark.parametrize("tokens, words", [
    (None, ["tokens"]),
    ("1 2 3", ["tokens"]),
    ([1, -1], ["-1", "vocabulary"]),
    ([1, 32002], ["32002", "vocabulary"]),
    ([2**63], [str(2**63)]),
    ([10**30], ["vocabulary"]),
    ([1.5], ["tokens"]),
    ([True], ["tokens"]),
    ([[1, 2]], ["tokens"]),
])
def test_detokenize_refuses_bad_ids(server, tokens, words):
    bad_request(server.http.post("/detokenize", json={"tokens": tokens}), *words)


def test_bad_json_is_a_400(server):
    for path in ("/tokenize", "/detokenize", "/apply-template", "/v1/embeddings", "/embeddings"):
        r = server.http.post(path, content=b'{"content": "x"', headers={"Content-Type": "application/json"})
        bad_request(r, "JSON")
        bad_request(server.http.post(path, content=b"\xff\xfe", headers={"Content-Type": "application/json"}))


def test_every_utility_route_needs_the_key(server):
    routes = [("POST", "/tokenize", {"content": "x"}), ("POST", "/detokenize", {"tokens": [1]}),
              ("POST", "/apply-template", {"messages": HI}), ("GET", "/metrics", None),
              ("POST", "/v1/embeddings", {"input": "x"}), ("POST", "/embeddings", {"input": "x"})]
    for method, path, body in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            r = httpx.request(method, server.url + path, json=body, headers=headers, timeout=30)
            assert r.status_code == 401, (path, headers, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"


# -- /apply-template ----------------------------------------------------------------------------
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_apply_template_matches_transformers(server, hf_tokenizer, add_generation_prompt):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 媽 <|im_end|>?"}]
    r = server.http.post("/apply-template", json={"messages": messages, "add_generation_prompt": add_generation_prompt})
    assert r.status_code == 200 and list(r.json()) == ["prompt"]
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert r.json()["prompt"] == expected


def test_apply_template_is_the_prompt_chat_completions_runs(server, hf_tokenizer):
    prompt = server.http.post("/apply-template", json={"messages": HI}).json()["prompt"]
    usage = server.v1.chat.completions.create(model=MODEL, messages=HI, max_tokens=1).usage
    assert usage.prompt_tokens == len(hf_tokenizer(prompt).input_ids)


def test_apply_template_writes_the_tools_offered(server):
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "the weather in a city",
                                               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    prompt = server.http.post("/apply-template", json={"messages": HI, "tools": tools}).json()["prompt"]
    assert "get_weather" in prompt and "<tools>" in prompt
    plain = server.http.post("/apply-template", json={"messages": HI, "tools": tools, "tool_choice": "none"})
    assert "get_weather" not in plain.json()["prompt"]


def test_apply_template_continues_the_last_message(server, hf_tokenizer):
    messages = [*HI, {"role": "assistant", "content": "Hello, I am"}]
    body = {"messages": messages, "continue_final_message": True, "add_generation_prompt": False}
    prompt = server.http.post("/apply-template", json=body).json()["prompt"]
    assert prompt == hf_tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)


@pytest.mark.parametrize("body, words", [
    ({}, ["messages"]),
    ({"messages": []}, ["messages"]),
    ({"messages": [{"role": "wizard", "content": "x"}]}, ["role"]),
    ({"messages": [{"role": "user", "content": 5}]}, ["content"]),
    ({"messages": HI, "add_generation_prompt": True, "continue_final_message": True}, ["continue_final_message"]),
    ({"messages": HI, "tools": [{"type": "function"}]}, ["tools"]),
])
def test_apply_template_refuses_bad_conversations(server, body, words):
    bad_request(server.http.post("/apply-template", json=body), *words)


# -- /metrics -----------------------------------------------------------------------------------
def metrics(server) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    r = server.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    out = {}
    for family in text_string_to_metric_families(r.text):
        assert family.documentation, family.name  # every metric says what it counts
        for sample in family.samples:
            out[sample.name] = (family.type, sample.value)
    return out


def test_metrics_parse_and_count_what_the_server_did(server):
    pytest.importorskip("prometheus_client")
    before = metrics(server)
    for name in ("llamacpp:prompt_tokens_total", "llamacpp:prompt_tokens_cached_total",
                 "llamacpp:tokens_predicted_total", "llamacpp:n_decode_total", "mistol_requests_total"):
        assert before[name][0] == "counter", name
    for name in ("llamacpp:requests_processing", "llamacpp:requests_deferred", "llamacpp:kv_cache_tokens",
                 "llamacpp:kv_cache_usage_ratio", "mistol_kv_cache_bytes"):
        assert before[name][0] == "gauge", name
    messages = [{"role": "user", "content": "Count the tokens of this request, please."}]
    r = server.v1.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0)
    again = server.v1.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0)
    server.v1.embeddings.create(model=MODEL, input=["one", "two words"])
    after = metrics(server)

    def delta(name):
        return after[name][1] - before[name][1]

    assert delta("mistol_requests_total") == 2
    assert delta("llamacpp:tokens_predicted_total") == r.usage.completion_tokens + again.usage.completion_tokens
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached > 0  # the second request found its prompt in a cache
    assert delta("llamacpp:prompt_tokens_cached_total") == cached + r.usage.prompt_tokens_details.cached_tokens
    assert delta("llamacpp:prompt_tokens_total") + delta("llamacpp:prompt_tokens_cached_total") == \
        r.usage.prompt_tokens + again.usage.prompt_tokens
    assert delta("mistol_embedding_inputs_total") == 2
    assert after["llamacpp:requests_processing"][1] == 0 and after["llamacpp:requests_deferred"][1] == 0
    assert after["llamacpp:kv_cache_tokens"][1] >= r.usage.prompt_tokens
    assert 0 < after["llamacpp:kv_cache_usage_ratio"][1] <= 1
    assert after["mistol_kv_cache_bytes"][1] > 0


# -- /v1/embeddings -----------------------------------------------------------------------------
def reference_embedding(hf_model, ids: list[int], pooling: str = "mean", normalize: bool = True) -> torch.Tensor:
    """transformers' final hidden state (after the last norm), pooled, L2-normalized."""
    with torch.no_grad():
        hidden = hf_model(torch.tensor([ids])).last_hidden_state[0].double()
    vector = {"mean": hidden.mean(0), "last": hidden[-1], "cls": hidden[0]}[pooling]
    return vector / vector.norm() if normalize else vector


def test_embeddings_match_transformers_hidden_states(server, hf_tokenizer, hf_model):
    texts = ["I believe the meaning of life is", "a " * 40]  # the second runs past the sliding window of 8
    r = server.v1.embeddings.create(model="text-embedding-3-small", input=texts)  # base64 on the wire
    assert r.object == "list" and r.model == MODEL and [d.index for d in r.data] == [0, 1]
    ids = [hf_tokenizer(t).input_ids for t in texts]
    assert r.usage.prompt_tokens == r.usage.total_tokens == sum(map(len, ids))
    for d, tokens in zip(r.data, ids):
        assert len(d.embedding) == hf_model.config.hidden_size
        assert math.isclose(sum(x * x for x in d.embedding), 1.0, rel_tol=1e-5)
        torch.testing.assert_close(torch.tensor(d.embedding, dtype=torch.float64),
                                   reference_embedding(hf_model, tokens), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pooling", ["mean", "last", "cls"])
def test_embedding_pooling_and_token_id_input(server, hf_model, pooling):
    ids = [1, 415, 5565, 302, 4843, 349, 28705, 28770, 28750, 28723, 2]
    r = server.v1.embeddings.create(model=MODEL, input=[ids], extra_body={"pooling": pooling})
    torch.testing.assert_close(torch.tensor(r.data[0].embedding, dtype=torch.float64),
                               reference_embedding(hf_model, ids, pooling), atol=1e-5, rtol=1e-4)


def test_embedding_normalizations_are_llama_cpps(server, hf_model, hf_tokenizer):
    text = "normalize me"
    ids = hf_tokenizer(text).input_ids
    raw = reference_embedding(hf_model, ids, normalize=False)

    def vector(norm):
        body = {"input": text, "embd_normalize": norm, "encoding_format": "float"}
        r = server.http.post("/v1/embeddings", json=body)
        assert r.status_code == 200
        return torch.tensor(r.json()["data"][0]["embedding"], dtype=torch.float64)

    torch.testing.assert_close(vector(-1), raw, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(vector(0), raw * 32760 / raw.abs().max(), atol=1e-2, rtol=1e-4)
    torch.testing.assert_close(vector(1), raw / raw.abs().sum(), atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(vector(3), raw / raw.abs().pow(3).sum() ** (1 / 3), atol=1e-6, rtol=1e-4)
    assert vector(0).abs().max().item() == pytest.approx(32760, rel=1e-6)


def test_embeddings_at_the_root_and_in_float(server):
    via_root = server.root.embeddings.create(model=MODEL, input="same text", encoding_format="float")
    via_v1 = server.v1.embeddings.create(model=MODEL, input="same text")  # base64 decoded by the client
    assert via_root.data[0].embedding == pytest.approx(via_v1.data[0].embedding, abs=1e-7)
    plain = server.http.post("/embeddings", json={"input": "same text"}).json()
    assert plain["data"][0]["object"] == "embedding"
    assert plain["data"][0]["embedding"] == pytest.approx(via_v1.data[0].embedding, abs=1e-7)


@pytest.mark.parametrize("body, words", [
    ({}, ["input"]),
    ({"input": []}, ["input"]),
    ({"input": [[]]}, ["input[0]"]),
    ({"input": 5}, ["input"]),
    ({"input": [1, "a"]}, ["input"]),
    ({"input": ["ok", None]}, ["input[1]"]),
    ({"input": [-1]}, ["-1", "vocabulary"]),
    ({"input": [[1, 2**40]]}, [str(2**40), "vocabulary"]),
    ({"input": [1.5]}, ["input"]),
    ({"input": {"content": "x"}}, ["input"]),
    ({"input": "x", "pooling": "none"}, ["pooling"]),
    ({"input": "x", "pooling": "max"}, ["pooling"]),
    ({"input": "x", "embd_normalize": "2"}, ["embd_normalize"]),
    ({"input": "x", "encoding_format": "hex"}, ["encoding_format"]),
    ({"input": "x", "dimensions": 3}, ["dimensions"]),
    ({"input": "x", "model": 7}, ["model"]),
    ({"input": [1] * (CONTEXT + 1)}, ["too large", str(CONTEXT)]),
    ({"input": ["x"] * 2049}, ["2048"]),
])
def test_embeddings_refuse_bad_input(server, body, words):
    bad_request(server.http.post("/v1/embeddings", json=body), *words)


def test_embeddings_never_race_decoding(server):
    """Embeddings run on the engine thread between decode steps: greedy replies decoded while
    embeddings are asked for are the ones decoded alone, and every embedding is the same."""
    messages = [{"role": "user", "content": "Tell me a long story about a cat."}]
    alone = server.v1.chat.completions.create(model=MODEL, messages=messages, max_tokens=40, temperature=0)
    single = server.http.post("/v1/embeddings", json={"input": "a text to embed " * 8}).json()["data"][0]["embedding"]

    async def together():
        async with httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=120) as http:
            body = {"model": MODEL, "messages": messages, "max_tokens": 40, "temperature": 0}
            # one chat, so that its rows are decoded alone either way: only the embeddings interleave
            chat = http.post("/v1/chat/completions", json=body)
            embeds = [http.post("/v1/embeddings", json={"input": ["a text to embed " * 8] * 3}) for _ in range(4)]
            return await asyncio.gather(chat, *embeds)

    results = asyncio.run(together())
    assert all(r.status_code == 200 for r in results), [r.text for r in results if r.status_code != 200]
    assert results[0].json()["choices"][0]["message"]["content"] == alone.choices[0].message.content
    for r in results[1:]:
        for d in r.json()["data"]:
            assert d["embedding"] == pytest.approx(single, abs=1e-6)
    assert json.loads(server.http.get("/health").text)["active"] == 0


ROUTES = [("/tokenize", '{"content": "a\\ud800b"}'), ("/detokenize", '{"tokens": [1], "x": "\\udfff"}'),
          ("/apply-template", '{"messages": [{"role": "user", "content": "\\ud800"}]}'),
          ("/v1/embeddings", '{"input": ["ok", "\\udc00"]}'), ("/embeddings", '{"input": "\\ud800"}'),
          ("/api/chat", '{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}'),
          ("/api/generate", '{"model": "m", "prompt": "\\ud800"}'), ("/api/embed", '{"model": "m", "input": "\\ud800"}')]


@pytest.mark.parametrize("path, body", ROUTES)
def test_hostile_bodies_get_clear_4xx_never_a_500(server, path, body):
    """A lone surrogate (valid JSON, not Unicode text), a body over the size limit, and JSON
    nested past any parser's recursion: each a 4xx with a one-line message, on every new route."""
    def message(r):
        error = r.json()["error"]
        text = error if isinstance(error, str) else error["message"]  # ollama's routes answer in its shape
        assert text and "\n" not in text and "Traceback" not in text
        return text

    headers = {"Content-Type": "application/json"}
    r = server.http.post(path, content=body.encode(), headers=headers)
    assert r.status_code == 400 and "surrogate" in message(r)
    r = server.http.post(path, content=b'{"content": "' + b"a" * (5 << 20) + b'"}', headers=headers)
    assert r.status_code == 413 and "limit" in message(r)
    r = server.http.post(path, content=b"[" * 100_000 + b"]" * 100_000, headers=headers)
    assert r.status_code == 400 and message(r)
