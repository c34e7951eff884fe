"""Tool call history of a task (tools.jsonl)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from context_storage.jsonl_log import JsonlLog


class ToolStore:
    """Appends numbered tool calls: the result when the call succeeded, else the error."""

    def __init__(self, context_dir: Path) -> None:
        self.context_dir = Path(context_dir)
        self.tools_file = self.context_dir / "tools.jsonl"
        self._log = JsonlLog(self.tools_file, key="seq")

    def add_tool_call(
        self, tool_name: str, args: Any, result: Any, status: str, duration_ms: float, error: str | None = None
    ) -> int:
        """Append a tool call; return its sequence number."""
        record: dict[str, Any] = {
            "tool": tool_name,
            "args": args,
            "status": status,
            "duration_ms": duration_ms,
            "timestamp": datetime.now(UTC).isoformat(),
        }
        if status == "success":
            record["result"] = result
        else:
            record["error"] = error
        return self._log.append(record)

    def count_tool_calls(self) -> int:
        """Tool calls written so far."""
        return self._log.last_number()
