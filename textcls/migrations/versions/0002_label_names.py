"""label names and unlabelled datasets

Datasets get ``label_names`` (the name of each class id, null for plain ids)
and ``labelled`` (false for a file of sentences only); models get
``label_names``, carried from their training data. Existing rows keep their
meaning: plain ids (null names), labelled.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("label_names", sa.JSON(), nullable=True))
        batch.add_column(
            sa.Column("labelled", sa.Boolean(), nullable=False, server_default=sa.true())
        )
    with op.batch_alter_table("models") as batch:
        batch.add_column(sa.Column("label_names", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("models") as batch:
        batch.drop_column("label_names")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("labelled")
        batch.drop_column("label_names")
