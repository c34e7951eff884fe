"""An agent process that drives a TaskContextManager and dies by SIGKILL at a named point.

Run as `python -m tests.support.crash_child POINT CONFIG_JSON UUID [resume]`. The points:

- `after-registration`: once the manager has started (the lock is held, the row written);
- `before-move`: at finish, after the row says finished and before the directory moves;
- `after-kept-statistics-write`: on resume, right after the statistics kept on disk reached the row,
  before metadata.json forgets them;
- `sending-kept-statistics`: on resume, once the statistics kept on disk are being sent (the test kills it
  while the statement waits on the server);
- `mid-append`: in the middle of writing a message line (half of its bytes are on disk);
- `mid-metadata`: in the middle of writing metadata.json's replacement, before it is renamed into place;
- `hold`: stay alive, holding the task, until standard input closes (then die);
- `never`: finish normally (complete()).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

from context_storage import (
    GitHubIssueTaskKey,
    TaskContextManager,
    jsonl_log,
    metadata_file,
    task_context_manager,
    unsaved,
)

KEY = GitHubIssueTaskKey("acme", "web", 1)


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main(point: str, config: dict[str, Any], task_uuid: str, resume: bool) -> None:
    if point == "before-move":

        def move_and_die(*_args: Any, **_kwargs: Any) -> None:
            die()

        task_context_manager.shutil.move = move_and_die  # type: ignore[assignment]
    if point == "after-kept-statistics-write":
        real = unsaved.send_batch

        def write_then_die(*args: Any) -> bool:
            written = real(*args)
            if written:
                die()
            return written

        unsaved.send_batch = write_then_die  # type: ignore[assignment]
    if point == "sending-kept-statistics":
        real_send = unsaved.send_batch

        def say_then_send(*args: Any) -> bool:
            print("sending", flush=True)
            return real_send(*args)

        unsaved.send_batch = say_then_send  # type: ignore[assignment]
    manager = TaskContextManager(KEY, task_uuid, config, is_resumed=resume)
    print("started", flush=True)
    if point in ("mid-append", "mid-metadata"):
        module = jsonl_log if point == "mid-append" else metadata_file
        real_write = os.write

        def half_then_die(descriptor: int, data: Any) -> int:
            real_write(descriptor, bytes(data)[: max(1, len(data) // 2)])
            die()
            return 0

        module.os.write = half_then_die  # type: ignore[attr-defined]
        if point == "mid-append":
            manager.get_message_store().add_message("assistant", "日本語のメッセージ " * 200)
        else:
            manager.complete()
    manager.get_message_store().add_message("user", "working")
    manager.update_statistics(llm_calls=1, tokens=10)
    if point == "after-registration":
        die()
    if point == "hold":
        sys.stdin.read()
        die()
    manager.complete()
    print("finished", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], len(sys.argv) > 4 and sys.argv[4] == "resume")
