"""The web app never imports the model side (DESIGN: web enqueues by name, never runs models)."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("service.inference", "service.worker", "onnxruntime", "torch")


def test_web_app_imports_nothing_of_the_model_side() -> None:
    code = ("import sys, service.web.app, service.web.images, service.web.cli, "
            "service.imaging.volume\n"
            f"bad = sorted(m for m in sys.modules if m.startswith({FORBIDDEN!r}))\n"
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
