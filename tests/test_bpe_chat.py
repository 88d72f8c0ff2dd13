"""`mistol chat` with a Llama 3 model: its own template, and the turn ends at `<|eot_id|>`.

A random model never emits `<|eot_id|>` by chance, so the model here is trained (a few hundred
steps on the CPU) to answer the prompt that transformers' apply_chat_template renders for the
chat's first turn with a fixed reply followed by `<|eot_id|>`. The tokenizer's EOS is
`<|end_of_text|>`, as in Llama 3.0 Instruct, so only the template's end-of-turn token can stop
the reply. If mistol rendered another prompt, the model would not give the reply; if it did
not stop at `<|eot_id|>`, the reply would go on for --max-tokens.
"""

from __future__ import annotations

import os
import sys

import pytest

from bpe_models import make_bpe_checkpoint
from mistol.chat.log import replay
from mistol.chat.repl import DEFAULT_SYSTEM

REPLY = "Hello from Llama three!"
USER = "hi"


def train_llama3_chat_model(path):
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    make_bpe_checkpoint(path, "llama3", hidden=64, layers=2)
    ref = AutoTokenizer.from_pretrained(path)
    messages = [{"role": "system", "content": DEFAULT_SYSTEM}, {"role": "user", "content": USER}]
    prompt = list(ref.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    reply = ref.encode(REPLY, add_special_tokens=False) + [ref.convert_tokens_to_ids("<|eot_id|>")]
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([prompt + reply])
    labels = ids.clone()
    labels[0, : len(prompt)] = -100  # learn the reply only
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(300):
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 0.02:  # every reply token is far ahead of the rest: greedy decoding gives the reply
            break
    model.save_pretrained(path)
    return prompt, reply


@pytest.fixture(scope="module")
def llama3_chat_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama3-chat")
    prompt, reply = train_llama3_chat_model(path)
    return path, prompt, reply


@pytest.mark.slow
def test_local_chat_uses_the_model_template_and_stops_at_eot(llama3_chat_model):
    from mistol.engine import Engine
    from mistol.llm import LocalLLM
    from mistol.sampling import SamplingParams

    path, prompt, reply = llama3_chat_model
    llm = LocalLLM(Engine.load(path, dtype="f32"))
    messages = [{"role": "system", "content": DEFAULT_SYSTEM}, {"role": "user", "content": USER}]
    assert llm.prompt_ids(messages) == prompt  # transformers' rendering, one BOS
    eot = llm.engine.tokenizer.token_id("<|eot_id|>")
    assert eot in llm.template.stop_ids and eot != llm.engine.tokenizer.eos_id
    text = "".join(llm.chat(messages, SamplingParams(temperature=0, max_tokens=40)))
    assert text == REPLY
    assert llm.last.finish_reason == "stop" and llm.last.token_ids == reply


@pytest.mark.slow
def test_terminal_chat_with_a_llama3_model_stops_at_its_end_of_turn(llama3_chat_model, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    path, _, _ = llama3_chat_model
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1", "PROMPT_TOOLKIT_NO_CPR": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "mistol", "chat", "--model", str(path), "-t", "0",
                                           "--max-tokens", "40", "--no-code"],
                          env=env, encoding="utf-8", timeout=120, dimensions=(40, 200))
    try:
        child.expect_exact(">>>")
        child.sendline(USER)
        child.expect_exact(REPLY)
        child.expect_exact(">>>")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    (log,) = (tmp_path / "mistol" / "chats").glob("*.jsonl")
    messages = replay(log)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    assert messages[2]["content"] == REPLY  # nothing after <|eot_id|>, within 40 tokens


@pytest.mark.slow
def test_gguf_of_the_model_chats_from_its_metadata_and_stops_at_eot(llama3_chat_model, tmp_path):
    """The same model converted by llama.cpp's converter: tokenizer, template and stop tokens
    come from the file's metadata alone."""
    import llama_cpp_ref

    from mistol.engine import Engine
    from mistol.llm import LocalLLM
    from mistol.sampling import SamplingParams

    path, prompt, reply = llama3_chat_model
    gguf = llama_cpp_ref.convert(path, tmp_path / "llama3-chat.gguf", pre="llama-bpe")
    llm = LocalLLM(Engine.load(gguf, dtype="f32"))
    messages = [{"role": "system", "content": DEFAULT_SYSTEM}, {"role": "user", "content": USER}]
    assert llm.prompt_ids(messages) == prompt
    assert "".join(llm.chat(messages, SamplingParams(temperature=0, max_tokens=40))) == REPLY
    assert llm.last.token_ids == reply
