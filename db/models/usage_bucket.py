"""The `token_usage_buckets` table: the tokens of pruned tasks, per user and 15 minutes of creation time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import BigInteger, Index, String
from sqlalchemy.orm import Mapped, mapped_column

from db.models.base import Base
from db.models.types import UTCDateTime

# Every time zone's offset has been a whole number of quarter hours since 1980 (Nepal's +05:45, Chatham's
# +12:45), so each zone's midnight, and each change of its offset, falls on a bucket's boundary: a bucket lies
# within one calendar day of every zone, and usage by day reads the same from buckets as from the tasks.
BUCKET = timedelta(minutes=15)


def bucket_start(moment: datetime) -> datetime:
    """The start (UTC) of the bucket that holds `moment`."""
    utc = moment.astimezone(UTC)
    return utc.replace(minute=utc.minute - utc.minute % 15, second=0, microsecond=0)


class UsageBucket(Base):
    """Tokens of pruned tasks of one user (None: tasks recorded without one) created in one bucket. Each
    pruning batch adds its own rows, so a user and bucket may have several: readers sum them."""

    __tablename__ = "token_usage_buckets"
    __table_args__ = (Index(None, "bucket_start"), Index(None, "user", "bucket_start"))

    id: Mapped[int] = mapped_column(primary_key=True)
    user: Mapped[str | None] = mapped_column(String(255))
    bucket_start: Mapped[datetime] = mapped_column(UTCDateTime())
    tokens: Mapped[int] = mapped_column(BigInteger())
