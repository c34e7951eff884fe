"""The tokens of pruned tasks, per user and 15 minutes, so that pruning changes no usage figure.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from db.models.types import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "token_usage_buckets",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("user", sa.String(255), nullable=True),
        sa.Column("bucket_start", UTCDateTime(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_token_usage_buckets"),
    )
    op.create_index("ix_token_usage_buckets_bucket_start", "token_usage_buckets", ["bucket_start"])
    op.create_index("ix_token_usage_buckets_user_bucket_start", "token_usage_buckets", ["user", "bucket_start"])


def downgrade() -> None:
    op.drop_index("ix_token_usage_buckets_user_bucket_start", table_name="token_usage_buckets")
    op.drop_index("ix_token_usage_buckets_bucket_start", table_name="token_usage_buckets")
    op.drop_table("token_usage_buckets")
