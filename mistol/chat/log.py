"""Chats saved as they happen: one JSON event per line, flushed at once.

Events: {"event": "message", "role", "content"} adds a message; {"event": "delta",
"content"} extends the last message (a reply is written while it streams, so a crash
loses nothing already shown); {"event": "undo"} drops the last exchange; {"event":
"reset"} clears all but the system prompt; {"event": "system", "content"} sets it;
{"event": "replace", "messages"} puts a loaded conversation in place.
Replaying the events rebuilds the conversation.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..errors import MistolError


def data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "mistol"


def chats_dir() -> Path:
    return data_dir() / "chats"


class ChatLog:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")

    @classmethod
    def create(cls, directory: Path | None = None) -> "ChatLog":
        directory = directory or chats_dir()
        stamp = time.strftime("%Y-%m-%dT%H-%M-%S")
        path = directory / f"{stamp}.jsonl"
        n = 1
        while path.exists():
            n += 1
            path = directory / f"{stamp}-{n}.jsonl"
        return cls(path)

    def write(self, event: str, **fields) -> None:
        self._file.write(json.dumps({"event": event, **fields}, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def latest_chat(directory: Path | None = None) -> Path:
    directory = directory or chats_dir()
    logs = sorted(directory.glob("*.jsonl"), key=lambda p: p.stat().st_mtime) if directory.is_dir() else []
    if not logs:
        raise MistolError(f"no saved chat to resume in {directory}")
    return logs[-1]


def replay(path: Path) -> list[dict]:
    """The conversation a log file (or a /save file) describes."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise MistolError(f"{path}: cannot read ({e.strerror})") from None
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict) and "messages" in whole:
        return _messages_file(path, whole)
    messages: list[dict] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
            apply_event(messages, event)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            if n == len(text.splitlines()):
                break  # a line cut short by a crash: everything before it stands
            raise MistolError(f"{path}:{n}: not a chat log line") from None
    return messages


def apply_event(messages: list[dict], event: dict) -> None:
    kind = event["event"]
    if kind == "message":
        messages.append({"role": event["role"], "content": event["content"]})
    elif kind == "delta":
        messages[-1]["content"] += event["content"]
    elif kind == "undo":
        drop_last_exchange(messages)
    elif kind == "reset":
        messages[:] = [m for m in messages[:1] if m["role"] == "system"]
    elif kind == "system":
        set_system(messages, event["content"])
    elif kind == "replace":
        messages[:] = [{"role": m["role"], "content": m["content"]} for m in event["messages"]]


def drop_last_exchange(messages: list[dict]) -> bool:
    """Remove the last user message and everything after it."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "user":
            del messages[i:]
            return True
    return False


def set_system(messages: list[dict], content: str) -> None:
    if messages and messages[0]["role"] == "system":
        messages[0] = {"role": "system", "content": content}
    else:
        messages.insert(0, {"role": "system", "content": content})


def save_messages(path: Path, messages: list[dict]) -> None:
    try:
        Path(path).write_text(json.dumps({"messages": messages}, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    except OSError as e:
        raise MistolError(f"{path}: cannot write ({e.strerror})") from None


def _messages_file(path, saved: dict) -> list[dict]:
    try:
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in saved["messages"]]
    except (KeyError, TypeError) as e:
        raise MistolError(f"{path}: not a saved chat ({e})") from None
