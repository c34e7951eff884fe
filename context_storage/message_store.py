"""Conversation history of a task: every message (messages.jsonl) and the live context (current.jsonl)."""

from __future__ import annotations

import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from context_storage.jsonl_log import JsonlLog, append_line, encode_line
from private_files import open_private

CHARS_PER_TOKEN = 4


def estimate_tokens(text: str) -> int:
    """The rough token count the agent has always used: four characters a token."""
    return len(text) // CHARS_PER_TOKEN


class MessageStore:
    """Appends messages to messages.jsonl (numbered, with timestamp and tokens) and to current.jsonl."""

    def __init__(self, context_dir: Path, config: dict[str, Any]) -> None:
        self.context_dir = Path(context_dir)
        self.config = config
        self.messages_file = self.context_dir / "messages.jsonl"
        self.current_file = self.context_dir / "current.jsonl"
        self._messages = JsonlLog(self.messages_file, key="seq")
        self._lock = threading.RLock()
        # (inode, size) of current.jsonl when its records were last counted, and that count: appends are
        # counted from where the last count ended, so the count costs what was added, not the whole file.
        self._counted: tuple[int, int] = (-1, 0)
        self._current_count = 0
        # (lines of current.jsonl, last message number, their tokens) at the last get_current_token_count().
        self._token_count: tuple[int, int, int] = (-1, 0, 0)

    def add_message(self, role: str, content: str, tool_name: str | None = None) -> int:
        """Append a message to both files; return its sequence number."""
        current: dict[str, Any] = {"role": role, "content": content}
        if tool_name is not None:
            current["tool_name"] = tool_name
        line = encode_line(current)
        # One message at a time, so that both files take the messages in the same order.
        with self._lock:
            seq = self._append_history(role, content, estimate_tokens(content), tool_name)
            append_line(self.current_file, lambda: line)
        return seq

    def count_messages(self) -> int:
        """Messages written so far (sequence numbers have no gaps)."""
        return self._messages.last_number()

    def get_current_token_count(self) -> int:
        """Tokens of the messages now in the live context: the last N, N being the lines of current.jsonl.

        Messages added since the last call are added to the last answer, so a call costs what changed.
        """
        with self._lock:
            lines, last = self._current_lines(), self._messages.last_number()
            counted_lines, counted_last, total = self._token_count
            added = last - counted_last
            if counted_lines < 0 or added < 0 or lines - counted_lines != added:
                added, total = lines, 0  # the context was rewritten (or the files disagree): count it afresh
            total += sum(int(record.get("tokens", 0)) for record in self._messages.tail(added))
            self._token_count = (lines, last, total)
            return total

    def get_current_context_file(self, unsummarized_file_path: Path | None = None) -> Path:
        """current.jsonl, or current_combined.jsonl: current.jsonl followed by the given file's lines."""
        if unsummarized_file_path is None:
            return self.current_file
        combined = self.context_dir / "current_combined.jsonl"
        _write_atomically(combined, _read_lines(self.current_file) + _read_lines(Path(unsummarized_file_path)))
        return combined

    def recreate_current_context(self, summary_text: str, summary_tokens: int, unsummarized_file_path: Path) -> None:
        """Replace current.jsonl by the summary (as an assistant message) and the unsummarised lines."""
        summary = encode_line({"role": "assistant", "content": summary_text}).decode("utf-8")
        with self._lock:
            _write_atomically(self.current_file, [summary, *_read_lines(Path(unsummarized_file_path))])
            self._append_history("assistant", summary_text, summary_tokens, None)

    def _append_history(self, role: str, content: str, tokens: int, tool_name: str | None) -> int:
        record: dict[str, Any] = {
            "role": role,
            "content": content,
            "timestamp": datetime.now(UTC).isoformat(),
            "tokens": tokens,
        }
        if tool_name is not None:
            record["tool_name"] = tool_name
        return self._messages.append(record)

    def _current_lines(self) -> int:
        with self._lock:
            try:
                info = self.current_file.stat()
            except FileNotFoundError:
                return 0
            inode, counted_size = self._counted
            start = counted_size if info.st_ino == inode and info.st_size >= counted_size else 0
            if start == 0:
                self._current_count = 0
            with self.current_file.open("rb") as handle:
                handle.seek(start)
                data = handle.read(info.st_size - start)
            # Only whole lines are counted; a torn tail is counted once it is cut off or completed.
            whole = data[: data.rfind(b"\n") + 1]
            self._current_count += sum(1 for line in whole.split(b"\n") if _is_record(line))
            self._counted = (info.st_ino, start + len(whole))
            return self._current_count


def _is_record(line: bytes) -> bool:
    if not line.strip():
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _read_lines(path: Path) -> list[str]:
    """The records of a JSONL file as lines ending in a newline, skipping torn or undecodable ones; [] for a
    missing file."""
    try:
        with path.open("rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        return []
    return [line.decode("utf-8") + "\n" for line in raw.split(b"\n") if _is_record(line)]


def _write_atomically(path: Path, lines: list[str]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with os.fdopen(open_private(temporary, os.O_WRONLY | os.O_TRUNC), "w", encoding="utf-8") as handle:
        handle.writelines(lines)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
