"""`mistol generate` prints what transformers' greedy generation prints."""

from __future__ import annotations

import subprocess
import sys

import torch

from checkpoints import reference


def test_generate_prints_the_reference_greedy_text(mistral_dir):
    from transformers import AutoTokenizer

    prompt = "The quick brown fox"
    tok = AutoTokenizer.from_pretrained(mistral_dir)
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ids[0, 0].item() == 1  # BOS in front, as mistol does
    with torch.no_grad():
        out = reference(mistral_dir).generate(ids, max_new_tokens=24, do_sample=False,
                                              eos_token_id=[2, 32000], pad_token_id=0)
    expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    result = subprocess.run(
        [sys.executable, "-m", "mistol", "generate", "--model", str(mistral_dir), "--prompt", prompt,
         "--max-tokens", "24", "--temperature", "0"],
        capture_output=True, text=True, check=True,
    )
    assert result.stdout == expected + "\n"
    assert len(expected) > 20


def test_generate_help_explains_the_options():
    out = subprocess.run([sys.executable, "-m", "mistol", "generate", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for option in ("--model", "--prompt", "--max-tokens", "--temperature", "--top-k", "--top-p", "--seed", "--quant"):
        assert option in out.stdout
