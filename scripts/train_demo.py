#!/usr/bin/env python3
"""Train the tiny demo model that ships with mistol (`--model demo`), on CPU.

It learns a few things: to answer arithmetic questions by writing a short Python block, and,
once the block's output is fed back, to state the answer; over conversations of up to 10
exchanges, after declined or failed runs, for paraphrased questions, with a short refusal for
anything else; to rewrite a short block with one change asked for; and to be either side of a
`mistol duo`. The conversations are synthetic ChatML (mistol/demo_dialogues.py,
mistol/demo_code_edits.py), tokenized exactly as the chat will at run time: the assistant's
code is followed by the `Output:` block as tool text (not learned: it is masked out of the
loss), then the answer sentence and <|im_end|>. Seeded and on one thread by default: the same
command gives the same weights (unless --minutes cuts the run short, which it says).

    python scripts/train_demo.py                      # from scratch, writes mistol/demo_model/
    python scripts/train_demo.py --minutes 2 --out /tmp/demo   # a quick try
    python scripts/train_demo.py --init DIR --max-steps 500 --lr 1e-3   # go on from a saved model

The shipped weights are `python scripts/train_demo.py --threads 2`: 2500 steps from scratch,
32 min on a 2-core machine (two threads may sum in another order on another CPU, and so
differ in the weights' last bits; one thread, the default, takes ~1 s of CPU a step, 42 min
on an idle core). On scripts/eval_demo.py (seed 2024): 100% of 200 paraphrases, 92.5% of the
turns of 20 ten-turn conversations (all 41 declines right), 0 gibberish replies; a duo's
answers 20/40; code edits 0/60 (it writes a block of its own instead of copying the one it
was shown: the programs' names come from a closed list that it learns by heart).

Needs `mistral-common` (pip install -e '.[test]'), which ships the Mistral tokenizer model.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mistol.chat_template import ChatTemplate  # noqa: E402
from mistol.demo_dialogues import make_conversation  # noqa: E402
from mistol.model import ModelConfig, Transformer  # noqa: E402
from mistol.tokenizer import Tokenizer  # noqa: E402
from mistol.weights.safetensors_file import save_safetensors  # noqa: E402

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CONFIG = dict(
    vocab_size=32002, hidden_size=192, intermediate_size=512, num_layers=4, num_heads=6, num_kv_heads=2,
    head_dim=32, rope_theta=10000.0, rms_norm_eps=1e-5, sliding_window=4096, max_position_embeddings=2048,
    tie_word_embeddings=True, bos_token_id=1, eos_token_id=32000,
)
MAX_EXCHANGES = 10  # the longest conversation trained on
MAX_TOKENS = 2048  # a conversation is cut there (CONFIG's max_position_embeddings)


def mistral_tokenizer_model() -> Path:
    import importlib.resources

    return Path(str(importlib.resources.files("mistral_common") / "data" / "tokenizer.model.v1"))


def make_tokenizer() -> Tokenizer:
    return Tokenizer.from_sentencepiece(
        mistral_tokenizer_model(), {"<|im_end|>": 32000, "<|im_start|>": 32001}, legacy=True,
        bos_token="<s>", eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE,
    )


def conversation(rng: random.Random, tok: Tokenizer, template: ChatTemplate, turns: int) -> tuple[list[int], list[int]]:
    """Token ids of a conversation of `turns` exchanges and a 0/1 mask of the tokens the model
    must learn: its own text in every reply, not the prompt nor the code runner's output."""
    system, exchanges = make_conversation(rng, turns)
    messages = [{"role": "system", "content": system}]
    ids: list[int] = []
    mask: list[int] = []
    end = tok.token_id("<|im_end|>")
    for exchange in exchanges:
        messages.append({"role": "user", "content": exchange.user})
        prompt = template.render(messages)  # ends with <|im_start|>assistant\n, as at run time
        mask += [0] * (len(prompt) - len(ids))
        ids = prompt
        for text, learn in exchange.reply:
            new = tok.encode_pieces([*ids, text])[len(ids):]  # text continuing the generated ids
            ids, mask = ids + new, mask + [int(learn)] * len(new)
        ids, mask = ids + [end], mask + [1]
        messages.append({"role": "assistant", "content": exchange.content})
        closing = tok.encode_pieces([end, "\n"])[1:]
        ids, mask = ids + closing, mask + [0] * len(closing)
    return ids, mask


def batches(rng, tok, template, tokens_per_step: int):
    """Batches of conversations with one number of exchanges each (1 to 10), so that rows have
    about the same length, filled up to about `tokens_per_step` positions, padding included
    (rows with code blocks are longer: their batches are smaller)."""
    while True:
        turns = rng.randint(1, MAX_EXCHANGES)
        convs: list[tuple[list[int], list[int]]] = []
        while len(convs) < 2 or len(convs) * max(len(ids) for ids, _ in convs) < tokens_per_step:
            ids, mask = conversation(rng, tok, template, turns)
            convs.append((ids[:MAX_TOKENS], mask[:MAX_TOKENS]))
        batch_size = len(convs)
        width = max(len(ids) for ids, _ in convs)
        tokens = torch.zeros(batch_size, width, dtype=torch.long)
        targets = torch.full((batch_size, width), -100, dtype=torch.long)
        for row, (ids, mask) in enumerate(convs):
            tokens[row, : len(ids)] = torch.tensor(ids)
            labels = [t if m else -100 for t, m in zip(ids[1:], mask[1:])]
            targets[row, : len(labels)] = torch.tensor(labels)
        yield tokens, targets


def sampled_softmax_loss(model: Transformer, tokens, targets, negatives: int) -> torch.Tensor:
    """Cross-entropy over the batch's target tokens plus random other tokens.

    The full 32002-way output layer would cost most of each step, though the data uses a few
    hundred distinct tokens; scoring the targets against a fresh random sample of the rest
    each step still teaches the model to rank every other token below them.
    """
    picked = targets != -100
    hidden = model.hidden_states(tokens)[picked]
    wanted = targets[picked]
    sample = torch.randint(0, model.config.vocab_size, (negatives,))
    candidates, index = torch.unique(torch.cat([wanted, sample]), return_inverse=True)
    logits = F.linear(hidden, model.embed_tokens.weight[candidates]).float()
    return F.cross_entropy(logits, index[: wanted.numel()])


def init_weights(model: Transformer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 2:
            std = 0.02 / math.sqrt(2 * model.config.num_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * std)
        else:
            with torch.no_grad():
                p.fill_(1.0)


def train(args) -> Path:
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok = make_tokenizer()
    template = ChatTemplate(tok, None)
    config = ModelConfig(**CONFIG)
    model = Transformer(config)
    init_weights(model, args.seed)
    if args.init:
        load_weights(model, Path(args.init))
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f} M parameters, {config.num_layers} layers, hidden {config.hidden_size}")
    decay = [p for p in model.parameters() if p.dim() == 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    data = batches(rng, tok, template, args.tokens_per_step)
    start = time.time()
    budget = args.minutes * 60 if args.minutes else math.inf
    step, smoothed = 0, None
    while step < args.max_steps:
        elapsed = time.time() - start
        if elapsed > budget:
            break
        # by steps alone unless --minutes bounds the run: then the same command gives the same weights anywhere
        progress = step / args.max_steps if not args.minutes else max(step / args.max_steps, elapsed / budget)
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
        for group in opt.param_groups:
            group["lr"] = lr
        tokens, targets = next(data)
        loss = sampled_softmax_loss(model, tokens, targets, args.negatives)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        smoothed = loss.item() if smoothed is None else 0.95 * smoothed + 0.05 * loss.item()
        if step % args.log_every == 0:
            left = (args.max_steps - step) * elapsed / step / 60 if step else 0.0
            print(f"step {step:5d}  {elapsed / 60:5.1f} min (~{left:.0f} min left)  lr {lr:.2e}  "
                  f"loss {loss.item():.4f}  (smoothed {smoothed:.4f})", flush=True)
        step += 1
    print(f"trained {step} steps in {(time.time() - start) / 60:.1f} min, final smoothed loss {smoothed:.4f}")
    if step < args.max_steps:
        print(f"(stopped by --minutes before --max-steps {args.max_steps}: not the reproducible run)")
    return save(model, tok, Path(args.out), args.init)


def load_weights(model: Transformer, model_dir: Path) -> None:
    """Start from a saved demo model (its config must match CONFIG)."""
    from mistol.weights.safetensors_file import SafetensorsFile

    weights = SafetensorsFile(model_dir / "model.safetensors")
    state = model.state_dict()
    for key in weights.keys():
        name = key.removeprefix("model.")
        with torch.no_grad():
            state[name].copy_(weights.tensor(key).float())
    print(f"starting from the weights in {model_dir}")


def save(model: Transformer, tok: Tokenizer, out: Path, started_from: str | None = None) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    c = model.config
    config = {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
        "rope_theta": c.rope_theta, "rms_norm_eps": c.rms_norm_eps, "sliding_window": c.sliding_window,
        "max_position_embeddings": c.max_position_embeddings, "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": 1, "eos_token_id": 32000, "hidden_act": "silu", "torch_dtype": "float16",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {("model." + k if not k.startswith("lm_head") else k): v.to(torch.float16)
               for k, v in model.state_dict().items() if not k.startswith("rotary")}
    save_safetensors(out / "model.safetensors", tensors, metadata={"format": "pt"})
    shutil.copyfile(mistral_tokenizer_model(), out / "tokenizer.model")
    (out / "added_tokens.json").write_text(json.dumps({"<|im_end|>": 32000, "<|im_start|>": 32001}, indent=2) + "\n")

    def token(content):
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}

    tokenizer_config = {
        "add_bos_token": True, "add_eos_token": False, "legacy": True, "tokenizer_class": "LlamaTokenizer",
        "added_tokens_decoder": {str(i): token(t) for i, t in
                                 [(0, "<unk>"), (1, "<s>"), (2, "</s>"), (32000, "<|im_end|>"), (32001, "<|im_start|>")]},
        "bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>", "pad_token": None,
        "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "NOTICE").write_text(
        "tokenizer.model is the Mistral 7B v0.1 tokenizer, (c) Mistral AI, distributed under the Apache License 2.0\n"
        "as part of the mistral-common package. The weights were trained by scripts/train_demo.py"
        + (", starting from an earlier demo model (--init).\n" if started_from else ", from scratch.\n")
    )
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"saved to {out} ({size / 1e6:.1f} MB)")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(ROOT / "mistol" / "demo_model"), help="where to write the model")
    p.add_argument("--minutes", type=float, default=None,
                   help="also stop after this many minutes, the schedule following the clock (not reproducible)")
    p.add_argument("--max-steps", type=int, default=2500)
    p.add_argument("--tokens-per-step", type=int, default=4000, help="about how many tokens each step trains on")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--negatives", type=int, default=2048, help="sampled output tokens per step besides the targets")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--init", default=None, metavar="DIR", help="start from this saved demo model instead of random weights")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default: 1, so that the weights do not depend on the machine's cores)")
    p.add_argument("--log-every", type=int, default=25)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # tiny weights late in training would otherwise crawl on CPU
    train(args)


if __name__ == "__main__":
    main()
