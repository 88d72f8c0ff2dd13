"""Byte-level BPE tokenizers trained with HF `tokenizers`, saved as the model families ship them.

Each family gets its own pipeline, as in the real tokenizer.json of Llama 3, Qwen 2.5, SmolLM2,
GPT-2 and the DeepSeek-R1 Qwen distills (pre-tokenizer regexes, normalizer, special tokens,
BOS post-processor, tokenizer_config.json and chat template), trained on a small text so that
training takes milliseconds. `make_bpe_checkpoint` adds a tiny random transformers model, so
that llama.cpp's converter can turn the directory into a GGUF file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Llama 3.1 Instruct's template, shortened to the parts without tools.
LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
# Qwen 2.5 Instruct's ChatML, with its default system prompt, without the tool branches.
QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
SMOLLM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Mistral Instruct v0.1's [INST] template: it refuses a system message.
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# The DeepSeek-R1 distills' template, without its tool and <think> handling.
DEEPSEEK_R1_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% else %}{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


@dataclass
class Family:
    """How one model family's tokenizer.json and tokenizer_config.json look."""

    name: str
    gguf_pre: str  # the name llama.cpp's converter gives its pre-tokenizer
    specials: list[str]
    bos: str | None
    eos: str
    chat_template: str
    arch: str = "llama"  # the transformers model the GGUF is converted from
    bos_by_post_processor: bool = False  # Llama 3 adds BOS in tokenizer.json's post-processor
    add_bos_token: bool | None = None  # tokenizer_config.json's flag, when it has one
    extra_vocab: int = 0  # model rows beyond the tokenizer's (Qwen pads its embedding)
    config: dict = field(default_factory=dict)


FAMILIES = {
    "llama3": Family("llama3", "llama-bpe",
                     ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                      "<|eom_id|>", "<|eot_id|>"],
                     bos="<|begin_of_text|>", eos="<|end_of_text|>", chat_template=LLAMA3_TEMPLATE,
                     bos_by_post_processor=True),
    "qwen2": Family("qwen2", "qwen2", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|im_end|>",
                    chat_template=QWEN2_TEMPLATE, arch="qwen2", extra_vocab=3, add_bos_token=False),
    "deepseek-r1-qwen": Family("deepseek-r1-qwen", "deepseek-r1-qwen",
                               ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"],
                               bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", chat_template=DEEPSEEK_R1_TEMPLATE,
                               arch="qwen2", add_bos_token=True, bos_by_post_processor=True, extra_vocab=2,
                               config={"tokenizer_class": "LlamaTokenizerFast"}),
    "smollm": Family("smollm", "smollm", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos="<|im_start|>",
                     eos="<|im_end|>", chat_template=SMOLLM_TEMPLATE),
    "gpt2": Family("gpt2", "gpt-2", ["<|endoftext|>"], bos="<|endoftext|>", eos="<|endoftext|>",
                   chat_template=MISTRAL_TEMPLATE),
}


def _pipeline(family: Family):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    if family.name == "llama3":
        tok = Tokenizer(models.BPE(ignore_merges=True))
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ])
    elif family.name in ("qwen2", "deepseek-r1-qwen"):
        tok = Tokenizer(models.BPE())
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ])
    elif family.name == "smollm":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ])
    else:
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    return tok


def training_text() -> list[str]:
    """A little English, code, numbers and other scripts: enough for a few hundred merges."""
    base = [
        "The quick brown fox jumps over the lazy dog. It's a dog's life, isn't it? We'll see, they'd say.",
        "def main(argv):\n    for i in range(10):\n        print(i * 2, end=' ')\n    return 0\n",
        "if (x > 0) {\n\treturn x;\n} else {\n\treturn -x;\n}\n",
        "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024 3.14159 1,000,000 123456789",
        "Hello, world! How are you today? I'm fine, thanks. You're welcome; I've been there.",
        "café naïve résumé Ångström Müller Straße", "日本語のテキストです。中文文本测试。한국어 텍스트",
        "Привет, мир! Ελληνικά κείμενα. مرحبا بالعالم", "😀 🎉 👍🏽 emoji and symbols ∑∫√∞ ≠ ≤ ≥",
        "   indented   spaces    and\ttabs\t\tand\n\nnewlines\r\n",
        "user assistant system message content role the and of to in is that for",
    ]
    return base * 4


def train_bpe_dir(path: Path, family: str | Family, vocab_size: int = 500) -> Path:
    """A trained tokenizer of `family`, saved as an HF directory (tokenizer.json and
    tokenizer_config.json) in `path`."""
    from tokenizers import pre_tokenizers, processors, trainers

    family = FAMILIES[family] if isinstance(family, str) else family
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = _pipeline(family)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(training_text(), trainer)
    tok.add_special_tokens(family.specials)
    if family.bos_by_post_processor:
        bos = (family.bos, tok.token_to_id(family.bos))
        tok.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A", pair=f"{family.bos} $A {family.bos} $B", special_tokens=[bos])
    tok.save(str(path / "tokenizer.json"))
    config = {
        "bos_token": family.bos,
        "eos_token": family.eos,
        "chat_template": family.chat_template,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
        **family.config,
    }
    if family.add_bos_token is not None:
        config["add_bos_token"] = family.add_bos_token
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def make_bpe_checkpoint(path: Path, family: str | Family, seed: int = 0, hidden: int = 32, layers: int = 1) -> Path:
    """`train_bpe_dir` plus a tiny random transformers model of the family's architecture."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    fam = FAMILIES[family] if isinstance(family, str) else family
    train_bpe_dir(path, fam)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
    ids = {"bos_token_id": tok.token_to_id(fam.bos) if fam.bos else None, "eos_token_id": tok.token_to_id(fam.eos)}
    common = dict(vocab_size=tok.get_vocab_size() + fam.extra_vocab, hidden_size=hidden, intermediate_size=hidden * 2,
                  num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False, **ids)
    torch.manual_seed(seed)
    if fam.arch == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model.save_pretrained(path)
    return Path(path)
