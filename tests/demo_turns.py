"""The demo model's greedy replies as the chat takes them, for tests that compare two ways
of running it (cache types, kernels)."""

from __future__ import annotations

from mistol.sampling import SamplingParams

QUESTIONS = ("What is 37 * 48?", "Please compute 9876 - 1234.", "what's 17 squared", "Tell me a joke")


def chat_reply(engine, question: str, max_tokens: int = 60) -> list[int]:
    """The greedy reply to one user message, up to where the chat stops it: the end of the
    turn, or of the first code block (the chat runs it)."""
    tok = engine.tokenizer
    prompt = tok.encode(f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n", add_bos=True,
                        parse_special=True)
    reply: list[int] = []
    for token in engine.new_session(max_context=256).generate(prompt, SamplingParams(temperature=0.0,
                                                                                     max_tokens=max_tokens)):
        reply.append(token)
        if tok.decode(reply).count("```") == 2:
            break
    return reply
