"""A task's context: JSONL message, summary and tool histories on disk, and its row in the tasks table."""

from context_storage.message_store import MessageStore
from context_storage.summary_store import SummaryStore
from context_storage.task_context_manager import PreviousRun, TaskContextManager
from context_storage.task_key import (
    GitHubIssueTaskKey,
    GitHubPullRequestTaskKey,
    GitLabIssueTaskKey,
    GitLabMergeRequestTaskKey,
    SupportsToDict,
    TaskKey,
    as_task_key,
    task_key_from_dict,
)
from context_storage.task_lock import TaskAlreadyRunningError
from context_storage.tool_store import ToolStore

__all__ = [
    "GitHubIssueTaskKey",
    "GitHubPullRequestTaskKey",
    "GitLabIssueTaskKey",
    "GitLabMergeRequestTaskKey",
    "MessageStore",
    "PreviousRun",
    "SummaryStore",
    "SupportsToDict",
    "TaskAlreadyRunningError",
    "TaskContextManager",
    "TaskKey",
    "ToolStore",
    "as_task_key",
    "task_key_from_dict",
]
