"""Pipeline trees in their own table, out of the `pipelines` row that every batch rewrites.

SQLite rewrites a whole row on UPDATE, overflow pages included: with the tree inline, each hop of a 1,000-node
chain rewrote its 0.6 MB tree and read through it to reach `row_version`.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        # A server still running on the old schema must not start a pipeline between the copy and the drop: its
        # tree would be lost. (Stop the servers before migrating; this makes sure.) SQLite locks the whole file.
        op.execute("LOCK TABLE pipelines IN SHARE ROW EXCLUSIVE MODE")
    op.create_table(
        "pipeline_trees",
        sa.Column("pipeline_id", sa.String(64), nullable=False),
        sa.Column("tree_json", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("pipeline_id", name=op.f("pk_pipeline_trees")),
    )
    op.execute("INSERT INTO pipeline_trees (pipeline_id, tree_json) SELECT id, tree_json FROM pipelines")
    with op.batch_alter_table("pipelines") as batch:
        batch.drop_column("tree_json")


def downgrade() -> None:
    with op.batch_alter_table("pipelines") as batch:
        batch.add_column(sa.Column("tree_json", sa.Text(), nullable=False, server_default=""))
    op.execute(
        "UPDATE pipelines SET tree_json = "
        "(SELECT tree_json FROM pipeline_trees WHERE pipeline_trees.pipeline_id = pipelines.id)"
    )
    with op.batch_alter_table("pipelines") as batch:
        batch.alter_column("tree_json", server_default=None)
    op.drop_table("pipeline_trees")
