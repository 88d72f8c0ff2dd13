"""Which tool format a model is shown tools in: Llama 3.1's own where its chat template is
Llama 3.x's (tools_llama3.py), the Hermes / Qwen one otherwise (tools.py)."""

from __future__ import annotations

from .tools import HermesFormat
from .tools_llama3 import Llama3Format, is_llama3_template


def tool_format(template) -> HermesFormat | Llama3Format:
    """The format for a `ChatTemplate`: Llama 3.1's where the model's template is Llama 3.x's (and its
    vocabulary has the header and end-of-turn tokens), Hermes otherwise."""
    return Llama3Format(template) if is_llama3_template(template) else HermesFormat()
