"""Command-line behaviours: tokenize, saving and loading chats, offline downloads, dtypes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from mistol.chat.log import replay


def run(*args, input=None, env=None, check=True):
    return subprocess.run([sys.executable, "-m", "mistol", *args], input=input, capture_output=True,
                          text=True, env=env, timeout=300, check=check)


@pytest.mark.slow
def test_tokenize_matches_the_reference(mistral_dir):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(mistral_dir)
    text = "<|im_start|>user\nHello,  wörld! 😃 <|im_end|>"
    special = json.loads(run("tokenize", "--model", str(mistral_dir), "--special", text).stdout)
    assert special == ref.encode(text)
    plain = json.loads(run("tokenize", "--model", str(mistral_dir), text).stdout)
    assert 32001 not in plain and plain == ref.encode(text, split_special_tokens=True)


def test_save_and_load_in_the_chat(mistral_dir, tmp_path):
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "data")}
    saved = tmp_path / "conv.json"
    script = f"first message\n/save {saved}\n/reset\n/load {saved}\nsecond message\n"
    run("chat", "--model", str(mistral_dir), "--max-tokens", "4", "-t", "0", input=script, env=env)
    conv = json.loads(saved.read_text())["messages"]
    assert [m["role"] for m in conv] == ["system", "user", "assistant"]
    (log,) = (tmp_path / "data" / "mistol" / "chats").glob("*.jsonl")
    messages = replay(log)
    assert [m["content"] for m in messages[:2]] == [conv[0]["content"], "first message"]
    assert messages[3]["content"] == "second message" and len(messages) == 5


def test_unreachable_hub_model_gives_one_clear_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    out = run("generate", "--model", "someone/not-downloaded", "-p", "hi", env=env, check=False)
    assert out.returncode == 1
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("mistol: error: someone/not-downloaded: could not download") and "--model DIR" in line


def test_bfloat16_and_float16_track_float32(mistral_dir):
    from mistol.engine import Engine

    tokens = list(range(100, 140))
    ref = Engine.load(mistral_dir, dtype="f32").new_session().feed(tokens, all_logits=True)
    for dtype in ("bf16", "f16"):
        logits = Engine.load(mistral_dir, dtype=dtype).new_session().feed(tokens, all_logits=True)
        assert logits.dtype == torch.float32
        agree = (logits.argmax(-1) == ref.argmax(-1)).float().mean()
        assert agree >= 0.9, (dtype, agree)
