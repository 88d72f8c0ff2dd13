"""The `gguf` package (llama.cpp's GGUF reader and writer), imported without mistral_common.

Where mistral_common is installed (it comes with vLLM, and with our test extra), `import gguf`
imports it too, for gguf's converter of Mistral's own tokenizer files: pydantic, pycountry and
the rest, ~30 MB of memory and 0.3 s on every start that opens a GGUF file. mistol never asks
gguf to convert a tokenizer, so gguf is imported while mistral_common is hidden (gguf takes
the ImportError for "not installed"), and mistral_common is importable again afterwards.
"""

from __future__ import annotations

import sys

if "gguf" not in sys.modules and "mistral_common" not in sys.modules:
    sys.modules["mistral_common"] = None  # type: ignore[assignment]  # importing it raises ImportError
    try:
        import gguf
    finally:
        if "mistral_common" in sys.modules and sys.modules["mistral_common"] is None:
            del sys.modules["mistral_common"]
else:
    import gguf

__all__ = ["gguf"]
