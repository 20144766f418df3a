"""DICOM result objects (SR TID 1500, SEG, optional Secondary Capture) and their store.

Everything here is built through highdicom's constructors from a
:class:`~service.imaging.volume.Volume` and a :class:`~service.findings.Findings`;
UIDs are derived deterministically (:mod:`service.results.uids`) so that rebuilding the same
analysis yields the same objects.
"""
