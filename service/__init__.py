"""cspine-triage: DICOM-listening triage service for cervical-spine CT.

Research software. The shipped model is trained on synthetic phantoms and is not for
clinical use.
"""

__version__ = "0.1.0"
