"""A conversation's KV cache saved to disk and restored: the resumed turn runs only its new
tokens and says exactly what a full re-run says; a file of another model, a damaged or a
tampered file is refused with its reason, and the turn then runs the whole history."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from checkpoints import make_checkpoint
from mistol.engine import Engine
from mistol.errors import MistolError
from mistol.llm import LocalLLM
from mistol.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=6)
HISTORY = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "one two three four"}]


def chat_once(llm, messages):
    reply = "".join(llm.chat(messages, GREEDY))
    return [*messages, {"role": "assistant", "content": reply}, {"role": "user", "content": "and five?"}]


@pytest.mark.parametrize("fixture", ["llama_dir", "mistral_dir"])  # plain and rolling (sliding window) caches
def test_a_restored_cache_runs_only_the_new_tokens_and_answers_the_same(fixture, request, tmp_path):
    engine = Engine.load(request.getfixturevalue(fixture), dtype="f32")
    first = LocalLLM(engine, max_context=64)
    messages = chat_once(first, HISTORY)
    path = tmp_path / "chat.kv"
    size = first.save_cache(path)
    assert size == path.stat().st_size > 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    resumed = LocalLLM(engine, max_context=64)
    assert resumed.restore_cache(path) is None
    assert resumed.session.tokens == first.session.tokens
    reply = "".join(resumed.chat(messages, GREEDY))

    fresh = LocalLLM(engine, max_context=64)
    expected = "".join(fresh.chat(messages, GREEDY))
    assert reply == expected
    assert resumed.last.prefilled_tokens < fresh.last.prefilled_tokens / 2, (resumed.last, fresh.last)
    # and the logits after the history are the same as a re-run's
    prompt = fresh.prompt_ids(messages)
    again = LocalLLM(engine, max_context=64)
    again.restore_cache(path)
    assert torch.allclose(again.session.feed(prompt), LocalLLM(engine, max_context=64).session.feed(prompt), atol=1e-5)


def test_a_cache_of_another_model_or_a_damaged_file_is_refused_with_its_reason(llama_dir, tmp_path):
    engine = Engine.load(llama_dir, dtype="f32")
    first = LocalLLM(engine, max_context=64)
    messages = chat_once(first, HISTORY)
    path = tmp_path / "chat.kv"
    first.save_cache(path)

    other = Engine.load(make_checkpoint(tmp_path / "other", arch="llama", seed=7), dtype="f32")  # same shape
    llm = LocalLLM(other, max_context=64)
    why = llm.restore_cache(path)
    assert why is not None and "another model" in why and llm.session.tokens == []
    assert "".join(llm.chat(messages, GREEDY)) == "".join(LocalLLM(other, max_context=64).chat(messages, GREEDY))

    assert "does not fit" in LocalLLM(engine, max_context=32).restore_cache(path)
    bf16 = LocalLLM(Engine.load(llama_dir, dtype="bf16"), max_context=64).restore_cache(path)
    assert bf16 is not None  # another dtype: other weights, or another cache dtype

    data = path.read_bytes()
    (tmp_path / "short.kv").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.kv").write_bytes(b"\x00" * 100)
    (tmp_path / "json.kv").write_text(json.dumps({"not": "a cache"}))
    for name in ("short.kv", "garbage.kv", "json.kv", "missing.kv"):
        fresh = LocalLLM(engine, max_context=64)
        assert fresh.restore_cache(tmp_path / name), name
        assert fresh.session.tokens == []

    # token ids changed in place (same length): their hash no longer matches
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    start, _ = header["tokens"]["data_offsets"]
    at = 8 + header_len + start
    tampered = bytearray(data)
    tampered[at] ^= 1
    (tmp_path / "tampered.kv").write_bytes(bytes(tampered))
    why = LocalLLM(engine, max_context=64).restore_cache(tmp_path / "tampered.kv")
    assert why is not None and "do not match" in why


def test_a_full_disk_leaves_the_previous_file_and_no_partial_one(llama_dir, tmp_path):
    import resource
    import signal

    llm = LocalLLM(Engine.load(llama_dir, dtype="f32"), max_context=64)
    chat_once(llm, HISTORY)
    path = tmp_path / "chat.kv"
    path.write_bytes(b"the previous file")
    # A file size limit stands in for a full disk: writes past it fail with EFBIG.
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
    try:
        with pytest.raises(MistolError, match="not saved"):
            llm.save_cache(path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert path.read_bytes() == b"the previous file"
    assert [f.name for f in tmp_path.iterdir()] == ["chat.kv"]


def test_chat_resume_takes_the_saved_cache(mistral_dir, tmp_path):
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path)}

    def chat(*args, text):
        return subprocess.run([sys.executable, "-m", "mistol", "chat", "--model", str(mistral_dir), "-t", "0",
                               "--max-tokens", "4", *args], input=text, capture_output=True, text=True, env=env,
                              timeout=300, check=True)

    first = chat(text="hello there\n")
    assert "KV cache saved for --resume" in first.stderr
    chats = tmp_path / "mistol" / "chats"
    (log,) = chats.glob("*.jsonl")
    kv = log.with_suffix(".kv")
    assert stat.S_IMODE(log.stat().st_mode) == 0o600 and stat.S_IMODE(kv.stat().st_mode) == 0o600
    assert stat.S_IMODE(chats.stat().st_mode) == 0o700
    resumed = chat("--resume", "-v", text="and again\n")
    assert "KV cache restored" in resumed.stderr, resumed.stderr
    kv.write_bytes(b"junk")
    again = chat("--resume", text="once more\n")
    assert "KV cache not used" in again.stderr and "history runs through the model again" in again.stderr
    skipped = chat("--no-save-kv", text="new chat\n")
    assert "KV cache saved" not in skipped.stderr


def test_the_servers_prefix_cache_survives_a_restart_per_api_key(mistral_dir, tmp_path):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from helpers import LoopbackServer
    from mistol.server import ServerOptions, create_app

    engine = Engine.load(mistral_dir, dtype="f32")
    kv_dir = tmp_path / "kv"
    conversation = [{"role": "user", "content": "tell me about the sea, the waves, the boats and the harbour"}]

    def ask(url, key, messages):
        r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=60,
                       json={"model": "m", "messages": messages, "max_tokens": 5, "temperature": 0})
        r.raise_for_status()
        body = r.json()
        return body["choices"][0]["message"]["content"], body["usage"]

    options = dict(model_name="m", max_context=256, kv_dir=str(kv_dir))
    with LoopbackServer(create_app(engine, ServerOptions(api_key=["alice-key", "bob-key"], **options))) as url:
        reply, first = ask(url, "alice-key", conversation)
    assert sorted(p.name for p in kv_dir.iterdir()) == ["prefix-0.kv", "replies.json"]
    assert stat.S_IMODE(kv_dir.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in kv_dir.iterdir())
    assert "alice-key" not in (kv_dir / "replies.json").read_text()

    follow_up = [*conversation, {"role": "assistant", "content": reply}, {"role": "user", "content": "and then?"}]
    # restarted with the keys in another order: the cache follows the key, not its place
    with LoopbackServer(create_app(engine, ServerOptions(api_key=["bob-key", "alice-key"], **options))) as url:
        _, bob = ask(url, "bob-key", follow_up)
        _, alice = ask(url, "alice-key", follow_up)
    assert bob["prompt_tokens_details"]["cached_tokens"] == 0
    assert alice["prompt_tokens_details"]["cached_tokens"] >= first["prompt_tokens"] + 4

    # another model's files are skipped: nothing cached, nothing wrong
    other = Engine.load(make_checkpoint(tmp_path / "other", seed=3), dtype="f32")
    with LoopbackServer(create_app(other, ServerOptions(api_key=["alice-key"], **options))) as url:
        _, usage = ask(url, "alice-key", follow_up)
    assert usage["prompt_tokens_details"]["cached_tokens"] == 0


def _rewrite_header(data: bytes, change) -> bytes:
    """The file `data` with its JSON header passed through `change` (the tensors' bytes kept)."""
    header_len = int.from_bytes(data[:8], "little")
    header = change(json.loads(data[8 : 8 + header_len]))
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded + data[8 + header_len :]


def _set(path: list, value):
    def change(header):
        node = header
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
        return header
    return change


TAMPERED_HEADERS = {
    "header a list": lambda h: [1, 2],
    "capacity not a number": _set(["__metadata__", "capacity"], "many"),
    "extra a list": _set(["__metadata__", "extra"], "[1, 2]"),
    "extra null": _set(["__metadata__", "extra"], "null"),
    "extra not a string": _set(["__metadata__", "extra"], 5),
    "shape with a word": lambda h: _set(["k", "shape"], ["two", *h["k"]["shape"][1:]])(h),
    "shape with a float": lambda h: _set(["k", "shape"], [float(h["k"]["shape"][0]), *h["k"]["shape"][1:]])(h),
    "shape negative": lambda h: _set(["k", "shape"], [-h["k"]["shape"][0], -1, *h["k"]["shape"][2:]])(h),
    "offsets words": _set(["k", "data_offsets"], ["a", "b"]),
    "tokens 2-D": lambda h: _set(["tokens", "shape"], [1, *h["tokens"]["shape"]])(h),
    "tokens 0-D": lambda h: _set(["tokens"], {"dtype": "I64", "shape": [],
                                             "data_offsets": [h["tokens"]["data_offsets"][0],
                                                              h["tokens"]["data_offsets"][0] + 8]})(h),
    "slot positions as floats": _set(["slot_pos", "dtype"], "F64"),
}


@pytest.fixture(scope="module")
def llama_saved(llama_dir, tmp_path_factory) -> tuple[Engine, bytes]:
    """An engine and the bytes of a file of one of its conversations' caches."""
    engine = Engine.load(llama_dir, dtype="f32")
    first = LocalLLM(engine, max_context=64)
    chat_once(first, HISTORY)
    path = tmp_path_factory.mktemp("saved") / "chat.kv"
    first.save_cache(path)
    return engine, path.read_bytes()


@pytest.mark.parametrize("tampering", TAMPERED_HEADERS)
def test_a_tampered_header_is_refused_with_its_reason_not_an_exception(tampering, llama_saved, tmp_path):
    """The server reads every file of --kv-dir at start and chat --resume reads its file:
    whatever a header says, the answer is a reason (the history then runs again)."""
    engine, data = llama_saved
    path = tmp_path / "chat.kv"
    path.write_bytes(_rewrite_header(data, TAMPERED_HEADERS[tampering]))
    llm = LocalLLM(engine, max_context=64)
    why = llm.restore_cache(path)
    assert why is not None and str(path) in why and "\n" not in why, why
    assert llm.session.tokens == []


def test_slot_positions_that_do_not_match_their_slots_are_refused(mistral_dir, tmp_path):
    """Slot s holds a position p with p % capacity == s (or none, -1): a file saying otherwise
    would make attention read the wrong keys."""
    engine = Engine.load(mistral_dir, dtype="f32")
    first = LocalLLM(engine, max_context=64)
    chat_once(first, HISTORY)
    path = tmp_path / "chat.kv"
    first.save_cache(path)
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8 : 8 + header_len])["slot_pos"]["data_offsets"]
    at = 8 + header_len + start
    slot_pos = torch.frombuffer(bytearray(data[at : 8 + header_len + end]), dtype=torch.int64).clone()
    assert LocalLLM(engine, max_context=64).restore_cache(path) is None
    for wrong in (slot_pos.flip(0), slot_pos + first.session.cache.capacity, torch.zeros_like(slot_pos)):
        path.write_bytes(data[:at] + wrong.numpy().tobytes() + data[8 + header_len + end :])
        llm = LocalLLM(engine, max_context=64)
        why = llm.restore_cache(path)
        assert why is not None and "slot" in why, why
        assert llm.session.tokens == []
