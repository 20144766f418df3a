"""analysis result (fracture suspected / no fracture found / inconclusive), plausibility

Revision ID: 0003_analysis_result
Revises: 0002_ingest_mpps
Create Date: 2026-12-03 16:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = '0003_analysis_result'
down_revision: str | None = '0002_ingest_mpps'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('analysis', schema=None) as batch_op:
        batch_op.add_column(sa.Column('result', sa.Enum('FRACTURE_SUSPECTED', 'NO_FRACTURE_FOUND', 'INCONCLUSIVE', name='analysisresult', native_enum=False, length=32), nullable=True))
        batch_op.add_column(sa.Column('plausibility', sa.JSON(), nullable=True))
    with op.batch_alter_table('finding', schema=None) as batch_op:
        batch_op.add_column(sa.Column('plausible', sa.Boolean(), nullable=True))
        batch_op.add_column(sa.Column('plausibility_reasons', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('finding', schema=None) as batch_op:
        batch_op.drop_column('plausibility_reasons')
        batch_op.drop_column('plausible')
    with op.batch_alter_table('analysis', schema=None) as batch_op:
        batch_op.drop_column('plausibility')
        batch_op.drop_column('result')
