"""one reason vocabulary: the volume loader's duplicate codes take the ingest rules' names

Revision ID: 0005_reason_vocabulary
Revises: 0004_web_auth
Create Date: 2026-12-03 17:20:00

``service.imaging.qc.QcReason`` and ``service.ingest.rules.ReasonCode`` became one enum,
``service.outcomes.SeriesReason``. Five loader codes meant what an ingest code already said;
their stored values are rewritten to the ingest name wherever a reason code is stored:
``series.state_reason``, ``analysis.reason_code`` and the worklist's
``study.priority_reason`` ("not analyzed: CODE"). The audit trail is append-only and
hash-chained: its events keep the code they were written with.

Downgrade: ``analysis.reason_code`` and ``study.priority_reason`` are written by the worker
only, so they go back to the loader's names; ``series.state_reason`` goes back only on series
the ingest rules had qualified (a refusal of an unqualified series came from the rules, whose
names did not change).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = '0005_reason_vocabulary'
down_revision: str | None = '0004_web_auth'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

RENAMED: dict[str, str] = {
    # the volume loader's former code -> the one code
    'NO_CT_IMAGES': 'NOT_CT',
    'NON_AXIAL': 'NOT_AXIAL',
    'INCONSISTENT_ORIENTATION': 'MIXED_ORIENTATION',
    'GANTRY_TILT_EXCESSIVE': 'GANTRY_TILT',
    'NO_READABLE_INSTANCES': 'NO_READABLE_IMAGES',
}
PRIORITY_PREFIX = 'not analyzed: '

series = sa.table('series', sa.column('state_reason', sa.String),
                  sa.column('qualified', sa.Boolean))
analysis = sa.table('analysis', sa.column('reason_code', sa.String))
study = sa.table('study', sa.column('priority_reason', sa.String))


def _rewrite(mapping: dict[str, str], *, series_only_qualified: bool) -> None:
    for old, new in mapping.items():
        where = series.c.state_reason == old
        if series_only_qualified:
            where = sa.and_(where, series.c.qualified.is_(True))
        op.execute(series.update().where(where).values(state_reason=new))
        op.execute(analysis.update().where(analysis.c.reason_code == old)
                   .values(reason_code=new))
        op.execute(study.update().where(study.c.priority_reason == PRIORITY_PREFIX + old)
                   .values(priority_reason=PRIORITY_PREFIX + new))


def upgrade() -> None:
    _rewrite(RENAMED, series_only_qualified=False)


def downgrade() -> None:
    _rewrite({new: old for old, new in RENAMED.items()}, series_only_qualified=True)
