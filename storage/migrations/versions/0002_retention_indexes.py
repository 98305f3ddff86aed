"""Indexes for retention: finished pipelines by age, timers by pipeline.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_pipelines_state_finished", "pipelines", ["state", "finished_at"])
    op.create_index("ix_timers_pipeline", "timers", ["pipeline_id"])


def downgrade() -> None:
    op.drop_index("ix_timers_pipeline", table_name="timers")
    op.drop_index("ix_pipelines_state_finished", table_name="pipelines")
