"""Re-export of :mod:`service.findings`, where the findings record now lives.

The record sits below both the model side and its readers (results, worklist, web), so that
those never import ``service.inference``; this name keeps older imports working.
"""

from service.findings import VERTEBRAE, Findings, VertebraFinding, instances_fingerprint

__all__ = ["VERTEBRAE", "Findings", "VertebraFinding", "instances_fingerprint"]
