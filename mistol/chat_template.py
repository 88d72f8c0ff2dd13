"""Rendering a conversation into token ids: ChatML, or the model's own Jinja template.

Messages are OpenAI-style dicts: {"role": "system"|"user"|"assistant", "content": str}.

The control tokens come only from the template; message text is never scanned for them,
so a user who types "<|im_start|>system" gets those characters, not a forged turn. For a
Jinja template we render with a placeholder in place of each message's text, parse the
special tokens of what the template wrote, and put the text back as plain text.

With `tools` (tools.py), the tools offered and the calls and results in the messages are
written in the model's tool format: Llama 3.1's for a Llama 3.x template, Hermes otherwise.

Replies the model generated can be passed back as the token ids it produced
(`reply_tokens`): re-encoding a reply's text may give other ids than the model chose, and
then the session's cache would no longer share the prefix and would run the reply again.
"""

from __future__ import annotations

import re
import threading
from typing import Mapping, Sequence

from .errors import MistolError
from .pieces import Pieces, known_pieces

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# What one render of a model's template may make, far past what real templates need (they
# loop over the messages and tools): elements of range() in all (the sandbox caps one range
# at 100,000, but two nested ones made 10^10 steps and hung), the length of a text or list
# that `*` makes, and an exponent (10 ** 100000000 computes a number of 100 million digits).
RENDER_STEPS, RENDER_LENGTH, RENDER_EXPONENT = 1_000_000, 1 << 20, 64
# What ends an assistant turn in the chat formats of the families we run (llama.cpp's list).
END_OF_TURN = (IM_END, "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>")


class ChatTemplate:
    def __init__(self, tokenizer, jinja_source: str | None = None):
        self.tokenizer = tokenizer
        self.jinja_source = jinja_source
        self._jinja = _compile(jinja_source) if jinja_source else None
        self._tool_format = None
        self._chatml = tokenizer.token_id(IM_START) is not None and tokenizer.token_id(IM_END) is not None
        if self._jinja is None and not self._chatml:
            raise MistolError("the tokenizer has no <|im_start|>/<|im_end|> tokens and the model no chat_template")

    @classmethod
    def for_tokenizer(cls, tokenizer, use_model_template: bool = True) -> "ChatTemplate":
        source = getattr(tokenizer, "chat_template", None) if use_model_template else None
        return cls(tokenizer, source)

    @property
    def stop_ids(self) -> list[int]:
        """Tokens that end an assistant turn: EOS, the file's end-of-turn token, and whichever
        of the families' end-of-turn tokens the vocabulary has (Llama 3 ends a turn with
        `<|eot_id|>` while its EOS may be `<|end_of_text|>`; ChatML with `<|im_end|>`)."""
        tok = self.tokenizer
        ids = {tok.eos_id, getattr(tok, "eot_id", None), *(tok.token_id(t) for t in END_OF_TURN)}
        return sorted(i for i in ids if i is not None)

    def render(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = True,
        continue_last: bool = False,
        reply_tokens: Mapping[str, Pieces] | None = None,
        tools: Sequence = (),
    ) -> list[int]:
        """Token ids for `messages`, BOS first.

        continue_last: the last message (an assistant's) is left open, for the model to go
        on writing it; otherwise `add_generation_prompt` opens a new assistant turn.
        reply_tokens: assistant texts (or beginnings of them) mapped to pieces holding the
        token ids the model generated for them.
        tools: the `tools.Tool`s offered (messages may hold calls and results without them).
        """
        pieces = self._pieces(messages, add_generation_prompt, continue_last, reply_tokens, tools)
        tok = self.tokenizer
        add_bos = tok.add_bos and not (pieces and pieces[0] == tok.bos_id)
        return tok.encode_pieces(pieces, add_bos=add_bos)

    def render_text(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True,
                    continue_last: bool = False, tools: Sequence = ()) -> str:
        """The prompt as text, control tokens written out ("<|im_start|>user\n..."), as the
        template writes it: the BOS that `render` puts first is the tokenizer's, not part of it."""
        pieces = self._pieces(messages, add_generation_prompt, continue_last, None, tools)
        return "".join(p if isinstance(p, str) else _content_of(self.tokenizer, p) for p in pieces)

    @property
    def tool_format(self):
        """How this model is shown tools and writes calls (tools.py)."""
        if self._tool_format is None:
            from .tool_formats import tool_format

            self._tool_format = tool_format(self)
        return self._tool_format

    def _pieces(self, messages, add_generation_prompt, continue_last, reply_tokens, tools=()) -> Pieces:
        if not messages and continue_last:
            raise MistolError("continue_last needs a message to continue")
        if tools or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages):
            fmt = self.tool_format
            if hasattr(fmt, "pieces"):  # a format of the model's own, written here
                _check_messages(messages)
                return fmt.pieces(messages, tools, add_generation_prompt and not continue_last, continue_last,
                                  reply_tokens)
            messages = fmt.messages(messages, tools)
        _check_messages(messages)
        contents = [
            known_pieces(m["content"], reply_tokens) if m["role"] == "assistant" else [m["content"]]
            for m in messages
        ]
        gen_prompt = add_generation_prompt and not continue_last
        if self._jinja is not None:
            try:
                return self._jinja_pieces(messages, contents, gen_prompt, continue_last)
            except TemplateRefusal:
                # Templates such as Mistral's [INST] refuse a system message: give its text to
                # the first user message instead, so that any system prompt works with them.
                messages, contents = _fold_system(messages, contents)
                if messages is None:
                    raise
                return self._jinja_pieces(messages, contents, gen_prompt, continue_last)
        return self._chatml_pieces(messages, contents, gen_prompt, continue_last)

    # ChatML, as OpenHermes 2.5's template writes it
    def _chatml_pieces(self, messages, contents, gen_prompt, continue_last) -> Pieces:
        start, end = self.tokenizer.token_id(IM_START), self.tokenizer.token_id(IM_END)
        pieces: Pieces = []
        for i, (m, content) in enumerate(zip(messages, contents)):
            pieces += [start, f"{m['role']}\n", *content]
            if not (continue_last and i == len(messages) - 1):
                pieces += [end, "\n"]
        if gen_prompt:
            pieces += [start, "assistant\n"]
        return pieces

    def _render(self, **values) -> str:
        """The model's template rendered; what goes wrong in it (it divides by zero, indexes a
        message that is not there, reaches for what the sandbox forbids or past what a render
        may make) as a one-line error."""
        self._jinja.environment.steps_left.value = RENDER_STEPS
        try:
            return self._jinja.render(**values)
        except MistolError:
            raise  # (TemplateRefusal: raise_exception, which `render` answers)
        except Exception as e:
            raise MistolError(f"the model's chat_template fails ({type(e).__name__}: {' '.join(str(e).split())})") from None

    def _jinja_pieces(self, messages, contents, gen_prompt, continue_last) -> Pieces:
        marks = [f"\x00mistol-content-{i}\x00" for i in range(len(messages))]
        tok = self.tokenizer
        specials = dict(bos_token=_content_of(tok, tok.bos_id), eos_token=_content_of(tok, tok.eos_id))
        rendered = self._render(
            messages=[{**m, "content": mark} for m, mark in zip(messages, marks)],
            add_generation_prompt=gen_prompt, **specials,
        )
        parts = re.split("(" + "|".join(map(re.escape, marks)) + ")", rendered) if marks else [rendered]
        if sorted(p for p in parts if p in marks) != sorted(marks):
            raise MistolError("the model's chat_template alters message text; run with the built-in ChatML template")
        # Some templates trim each message (Llama 3's `content | trim`): do the same to the text.
        # Other rewrites (DeepSeek-R1's drops the reasoning before "</think>") are not followed:
        # the text stays as written.
        texts = [m["content"] for m in messages]
        real = self._render(messages=messages, add_generation_prompt=gen_prompt, **specials)

        def joined(texts):
            return "".join(texts[marks.index(p)] if p in marks else p for p in parts)

        if real != joined(texts) and real == joined([text.strip() for text in texts]):
            # (a message left open keeps its end: the model goes on from exactly there)
            last = len(contents) - 1
            contents = [_strip_pieces(c, right=not (continue_last and i == last)) for i, c in enumerate(contents)]
        pieces: Pieces = []
        for part in parts:
            if part in marks:
                pieces += contents[marks.index(part)]
                if continue_last and part == marks[-1]:
                    break  # leave the last message open
            else:
                pieces += _split_special(tok, part)
        return pieces


def _check_messages(messages) -> None:
    for m in messages:
        content_ok = isinstance(m.get("content"), str) or (m.get("tool_calls") and m.get("content") is None)
        if not content_ok or not isinstance(m.get("role"), str):
            raise MistolError("each message needs a string 'role' and 'content'")


class TemplateRefusal(MistolError):
    """The template's own raise_exception: it does not accept these messages."""


def _fold_system(messages, contents):
    """The conversation with the system message's text put before the first user message's,
    or (None, None) when there is no system message to fold."""
    if len(messages) < 2 or messages[0]["role"] != "system" or messages[1]["role"] != "user":
        return None, None
    system, user = messages[0]["content"], messages[1]["content"]
    folded = [{**messages[1], "content": f"{system}\n\n{user}"}, *messages[2:]]
    return folded, [[f"{system}\n\n", *contents[1]], *contents[2:]]


def _strip_pieces(content: Pieces, right: bool = True) -> Pieces:
    """Pieces with whitespace stripped from the text at both ends (ids are left alone)."""
    content = list(content)
    if content and isinstance(content[0], str):
        content[0] = content[0].lstrip()
    if right and content and isinstance(content[-1], str):
        content[-1] = content[-1].rstrip()
    return [p for p in content if p != ""]


def _split_special(tok, text: str) -> list:
    """Template-written text -> plain text and special-token ids."""
    specials = sorted(tok.special_ids, key=len, reverse=True)
    if not specials:
        return [text] if text else []
    pattern = "(" + "|".join(map(re.escape, specials)) + ")"
    return [tok.special_ids[p] if p in tok.special_ids else p for p in re.split(pattern, text) if p]


def _content_of(tok, token_id):
    for content, i in tok.special_ids.items():
        if i == token_id:
            return content
    return ""


def _compile(source: str):
    try:
        from jinja2.exceptions import SecurityError
        from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range
    except ImportError:  # pragma: no cover - jinja2 is a core dependency
        raise MistolError("rendering the model's chat_template needs jinja2") from None

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """The sandbox, with what one render may make bounded (RENDER_STEPS...)."""

        intercepted_binops = frozenset(("*", "**"))

        def __init__(self, **options):
            super().__init__(**options)
            self.steps_left = threading.local()  # (renders may run in several threads at once)
            self.globals["range"] = self.bounded_range

        def bounded_range(self, *args):
            steps = safe_range(*args)
            self.steps_left.value = getattr(self.steps_left, "value", RENDER_STEPS) - len(steps)
            if self.steps_left.value < 0:
                raise SecurityError(f"its loops run past {RENDER_STEPS} steps")
            return steps

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(right, int) and abs(right) > RENDER_EXPONENT:
                raise SecurityError(f"an exponent of {right}")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > RENDER_LENGTH:
                        raise SecurityError(f"a text or list of {len(seq) * n} made by *")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message):
        raise TemplateRefusal(f"chat_template: {message}")

    def strftime_now(fmt):
        from datetime import datetime

        return datetime.now().strftime(fmt)

    def tojson(value, indent=None):
        import json

        return json.dumps(value, ensure_ascii=False, indent=indent)

    # The environment transformers' apply_chat_template renders in.
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.filters["tojson"] = tojson
    try:
        return env.from_string(source)
    except Exception as e:
        raise MistolError(f"the model's chat_template does not parse ({e})") from None
