"""Keys that name the issue or merge request a task works on, and their mapping to task rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol


@dataclass(frozen=True)
class _TaskKey:
    TYPE: ClassVar[str]
    SOURCE: ClassVar[str]
    KIND: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def task_fields(self) -> dict[str, str]:
        """The columns that identify the task in the tasks table."""
        raise NotImplementedError


@dataclass(frozen=True)
class _GitHubKey(_TaskKey):
    owner: str
    repo: str
    number: int
    SOURCE: ClassVar[str] = "github"

    def __post_init__(self) -> None:
        _require_text("owner", self.owner)
        _require_text("repo", self.repo)
        object.__setattr__(self, "number", _whole_number("number", self.number))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, "owner": self.owner, "repo": self.repo, "number": self.number}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> _GitHubKey:
        _expect_type(cls.TYPE, data)
        return cls(owner=data["owner"], repo=data["repo"], number=data["number"])

    def task_fields(self) -> dict[str, str]:
        return {
            "task_source": self.SOURCE,
            "owner": self.owner,
            "repo": self.repo,
            "task_type": self.KIND,
            "task_id": str(self.number),
        }


@dataclass(frozen=True)
class GitHubIssueTaskKey(_GitHubKey):
    """A GitHub issue: owner/repo#number."""

    TYPE: ClassVar[str] = "github_issue"
    KIND: ClassVar[str] = "issue"


@dataclass(frozen=True)
class GitHubPullRequestTaskKey(_GitHubKey):
    """A GitHub pull request: owner/repo#number."""

    TYPE: ClassVar[str] = "github_pull_request"
    KIND: ClassVar[str] = "pull_request"


@dataclass(frozen=True)
class GitLabIssueTaskKey(_TaskKey):
    """A GitLab issue: project_id#issue_iid."""

    project_id: int | str
    issue_iid: int
    TYPE: ClassVar[str] = "gitlab_issue"
    SOURCE: ClassVar[str] = "gitlab"
    KIND: ClassVar[str] = "issue"

    def __post_init__(self) -> None:
        _require_project("project_id", self.project_id)
        object.__setattr__(self, "issue_iid", _whole_number("issue_iid", self.issue_iid))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, "project_id": self.project_id, "issue_iid": self.issue_iid}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GitLabIssueTaskKey:
        _expect_type(cls.TYPE, data)
        return cls(project_id=data["project_id"], issue_iid=data["issue_iid"])

    def task_fields(self) -> dict[str, str]:
        return _gitlab_fields(self.KIND, self.project_id, self.issue_iid)


@dataclass(frozen=True)
class GitLabMergeRequestTaskKey(_TaskKey):
    """A GitLab merge request: project_id!mr_iid."""

    project_id: int | str
    mr_iid: int
    TYPE: ClassVar[str] = "gitlab_merge_request"
    SOURCE: ClassVar[str] = "gitlab"
    KIND: ClassVar[str] = "merge_request"

    def __post_init__(self) -> None:
        _require_project("project_id", self.project_id)
        object.__setattr__(self, "mr_iid", _whole_number("mr_iid", self.mr_iid))

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, "project_id": self.project_id, "mr_iid": self.mr_iid}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GitLabMergeRequestTaskKey:
        _expect_type(cls.TYPE, data)
        return cls(project_id=data["project_id"], mr_iid=data["mr_iid"])

    def task_fields(self) -> dict[str, str]:
        return _gitlab_fields(self.KIND, self.project_id, self.mr_iid)


TaskKey = GitHubIssueTaskKey | GitHubPullRequestTaskKey | GitLabIssueTaskKey | GitLabMergeRequestTaskKey
_KEY_CLASSES = (GitHubIssueTaskKey, GitHubPullRequestTaskKey, GitLabIssueTaskKey, GitLabMergeRequestTaskKey)
_KEY_TYPES: dict[str, Any] = {key.TYPE: key for key in _KEY_CLASSES}


class SupportsToDict(Protocol):
    """Any task key that describes itself as a dict: this package's keys, and the agent's own."""

    def to_dict(self) -> dict[str, Any]: ...


def task_key_from_dict(data: dict[str, Any]) -> TaskKey:
    """The key that `data` (a `to_dict()` result) describes; ValueError naming what is wrong."""
    key_type = data.get("type")
    if not isinstance(key_type, str) or key_type not in _KEY_TYPES:
        raise ValueError(f"unknown task key type {key_type!r}; allowed: {', '.join(_KEY_TYPES)}")
    try:
        key: TaskKey = _KEY_TYPES[key_type].from_dict(data)
    except KeyError as exc:
        raise ValueError(f"a task key of type {key_type!r} needs {exc.args[0]!r}") from None
    return key


def as_task_key(key: SupportsToDict) -> TaskKey:
    """`key` as one of this package's keys: itself, or the key its `to_dict()` describes (the agent's own
    key classes, which have `to_dict()` but not `task_fields()`)."""
    if isinstance(key, _KEY_CLASSES):
        return key
    to_dict = getattr(key, "to_dict", None)
    if not callable(to_dict):
        raise TypeError(f"a task key needs a to_dict() method; got {type(key).__name__}")
    data = to_dict()
    if not isinstance(data, dict):
        raise TypeError(f"{type(key).__name__}.to_dict() must return a dict, got {type(data).__name__}")
    return task_key_from_dict(data)


def _expect_type(expected: str, data: dict[str, Any]) -> None:
    if data.get("type") != expected:
        raise ValueError(f"expected a task key of type {expected!r}, got {data.get('type')!r}")


def _gitlab_fields(kind: str, project_id: int | str, iid: int) -> dict[str, str]:
    # GitLab has no owner: the project id takes the repo column, as before the migration.
    return {"task_source": "gitlab", "owner": "", "repo": str(project_id), "task_type": kind, "task_id": str(iid)}


# Column widths of owner, repo and task_id in the tasks table.
_TEXT_LENGTH = 255
_NUMBER_DIGITS = 50


def _require_text(name: str, value: object) -> None:
    if not isinstance(value, str) or not value or len(value) > _TEXT_LENGTH:
        raise ValueError(
            f"a task key's {name} must be non-empty text of at most {_TEXT_LENGTH} characters, got {value!r}"
        )


def _require_project(name: str, value: object) -> None:
    if isinstance(value, str):
        _require_text(name, value)
    else:
        _whole_number(name, value)


def _whole_number(name: str, value: object) -> int:
    """`value` as a whole number: an int, or its decimal digits as text (as the agent's keys give)."""
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 10**_NUMBER_DIGITS:
        raise ValueError(f"a task key's {name} must be a whole number of at most 50 digits, got {value!r}")
    return value
