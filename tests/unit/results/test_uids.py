from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.uid import UID

from service.results import uids
from service.results.uids import ObjectKind

ROOT = "1.2.826.0.1.3680043.10.1455."
SERIES = "1.2.3.4.5.6.7"


def test_same_inputs_same_uid_and_under_root() -> None:
    a = uids.sop_instance_uid(ROOT, SERIES, "1.0.0", ObjectKind.SR)
    b = uids.sop_instance_uid(ROOT, SERIES, "1.0.0", "SR")
    assert a == b
    assert a.startswith(ROOT) and UID(a).is_valid and len(a) <= 64


def test_every_component_changes_the_uid() -> None:
    base = uids.sop_instance_uid(ROOT, SERIES, "1.0.0", ObjectKind.SR)
    others = {
        uids.sop_instance_uid(ROOT, SERIES + ".1", "1.0.0", ObjectKind.SR),
        uids.sop_instance_uid(ROOT, SERIES, "1.0.1", ObjectKind.SR),
        uids.sop_instance_uid(ROOT, SERIES, "1.0.0", ObjectKind.SEG),
        uids.sop_instance_uid(ROOT, SERIES, "1.0.0", ObjectKind.SR_LABELMAP),
        uids.series_instance_uid(ROOT, SERIES, "1.0.0", ObjectKind.SR),
        uids.sop_instance_uid("1.2.3.", SERIES, "1.0.0", ObjectKind.SR),
    }
    assert base not in others and len(others) == 6


def test_parts_are_not_ambiguous_when_concatenated() -> None:
    assert uids.derive_uid(ROOT, "ab", "c") != uids.derive_uid(ROOT, "a", "bc")


def test_bad_root_rejected() -> None:
    with pytest.raises(ValueError):
        uids.derive_uid("1.2.3", "x")


@given(series=st.from_regex(r"[1-9][0-9]{0,5}(\.[1-9][0-9]{0,8}){2,8}", fullmatch=True),
       version=st.text(min_size=1, max_size=20).filter(lambda s: "\x1f" not in s),
       kind=st.sampled_from(list(ObjectKind)))
def test_derived_uids_always_valid(series: str, version: str, kind: ObjectKind) -> None:
    for uid in (uids.sop_instance_uid(ROOT, series, version, kind),
                uids.series_instance_uid(ROOT, series, version, kind),
                uids.tracking_uid(ROOT, series, version, "C1")):
        assert UID(uid).is_valid and len(uid) <= 64
        assert all(part == "0" or not part.startswith("0") for part in uid.split("."))
