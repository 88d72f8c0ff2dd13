"""`OpenAICompatibleLLM`: the `LLM` interface over any OpenAI-compatible server.

mistol's own `mistol serve`, llama.cpp's server, vLLM and ollama all speak this API, so a
front end can move from the in-process engine to a bigger machine by changing one flag.
Only the standard library is used: the protocol is plain JSON and server-sent events.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence

from .errors import MistolError
from .generation import Generation
from .sampling import SamplingParams


class OpenAICompatibleLLM:
    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None, timeout: float = 600):
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        self.api_key = api_key
        self.timeout = timeout
        self._model = model
        self.last: Generation | None = None
        self.dropped = 0  # the server manages its context

    @property
    def model(self) -> str:
        if self._model is None:
            models = self._request("GET", "/models").get("data") or []
            if not models:
                raise MistolError(f"{self.base_url}: the server lists no models; pass --api-model")
            self._model = models[0]["id"]
        return self._model

    def chat(self, messages: Sequence[dict], params: SamplingParams, continue_last: bool = False) -> Iterator[str]:
        body = {
            "model": self.model,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            # Extensions understood by mistol, llama.cpp and vLLM; others ignore them.
            "top_k": params.top_k,
            "min_p": params.min_p,
            "repetition_penalty": params.repetition_penalty,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if continue_last:  # vLLM's and mistol's way to let the model go on writing a message
            body.update(continue_final_message=True, add_generation_prompt=False)
        result = Generation()
        self.last = result
        start = time.perf_counter()
        response = self._open("POST", "/chat/completions", body)
        with response:
            for event in _sse_events(response):
                if event.get("usage"):
                    result.prompt_tokens = event["usage"].get("prompt_tokens", 0)
                    result.completion_tokens = event["usage"].get("completion_tokens", result.completion_tokens)
                for choice in event.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content") or ""
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
                    if piece:
                        now = time.perf_counter()
                        if result.time_to_first_token is None:
                            result.time_to_first_token = now - start
                            first = now
                        result.decode_seconds = now - first
                        result.completion_tokens += 1
                        result.text += piece
                        yield piece

    # -- HTTP ------------------------------------------------------------------------------
    def _open(self, method: str, path: str, body: dict | None = None):
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raise MistolError(f"{self.base_url}{path}: HTTP {e.code}: {_error_message(e)}") from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise MistolError(f"cannot reach {self.base_url} ({reason})") from None

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        with self._open(method, path, body) as response:
            try:
                return json.loads(response.read())
            except json.JSONDecodeError:
                raise MistolError(f"{self.base_url}{path}: the server's answer is not JSON") from None


def _sse_events(response) -> Iterator[dict]:
    for raw in response:
        line = raw.decode("utf-8", errors="replace").strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except json.JSONDecodeError:
            continue
        if "error" in event:
            raise MistolError(f"server error: {event['error'].get('message', event['error'])}")
        yield event


def _error_message(error: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(error.read())
        return body["error"]["message"]
    except Exception:
        return error.reason or "error"
