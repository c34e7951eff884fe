"""Summaries of compressed conversation ranges (summaries.jsonl)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from context_storage.jsonl_log import JsonlLog


class SummaryStore:
    """Appends numbered summaries; the latest one is read from the file's tail."""

    def __init__(self, context_dir: Path) -> None:
        self.context_dir = Path(context_dir)
        self.summaries_file = self.context_dir / "summaries.jsonl"
        self._log = JsonlLog(self.summaries_file, key="id")

    def add_summary(
        self, start_seq: int, end_seq: int, summary_text: str, original_tokens: int, summary_tokens: int
    ) -> int:
        """Append a summary of messages start_seq..end_seq; return its id."""
        return self._log.append(
            {
                "start_seq": start_seq,
                "end_seq": end_seq,
                "summary": summary_text,
                "original_tokens": original_tokens,
                "summary_tokens": summary_tokens,
                "ratio": summary_tokens / original_tokens if original_tokens else 0.0,
                "timestamp": datetime.now(UTC).isoformat(),
            }
        )

    def get_latest_summary(self) -> dict[str, Any] | None:
        """The most recent summary, or None."""
        return self._log.last_record()

    def count_summaries(self) -> int:
        """Summaries written so far."""
        return self._log.last_number()
