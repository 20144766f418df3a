"""The scripts the images run: requirement list, build-time self-check, health probe."""

from __future__ import annotations

import http.server
import socket
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from .common import REPO_ROOT, load_script

requirements = load_script("runtime-requirements.py")
verify = load_script("verify-image.py")
healthcheck = load_script("healthcheck.py")

PYPROJECT = REPO_ROOT / "pyproject.toml"


# --- runtime-requirements.py ---------------------------------------------------------------

def test_gpu_list_swaps_onnxruntime_for_onnxruntime_gpu() -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    out = requirements.runtime_requirements(PYPROJECT, ["gpu"], ["onnxruntime"])
    names = [requirements.requirement_name(r) for r in out]
    assert "onnxruntime" not in names
    assert "onnxruntime-gpu" in names
    expected = [r for r in project["dependencies"]
                if requirements.requirement_name(r) != "onnxruntime"]
    assert out == expected + project["optional-dependencies"]["gpu"]
    assert "torch" not in names


def test_cpu_list_is_the_dependencies() -> None:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    assert requirements.runtime_requirements(PYPROJECT, [], []) == project["dependencies"]


def test_names_normalize_and_unknown_extras_fail(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["ONNXRuntime>=1.18", '
                         '"celery[redis]>=5.4", "numpy; python_version>=\'3.11\'"]\n'
                         '[project.optional-dependencies]\ngpu = ["onnxruntime-gpu>=1.20"]\n')
    out = requirements.runtime_requirements(pyproject, ["gpu"], ["onnxruntime"])
    assert out == ["celery[redis]>=5.4", "numpy; python_version>='3.11'", "onnxruntime-gpu>=1.20"]
    with pytest.raises(KeyError, match="cuda"):
        requirements.runtime_requirements(pyproject, ["cuda"], [])


def test_cli_prints_one_requirement_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert requirements.main([str(PYPROJECT), "--extra", "gpu", "--exclude", "onnxruntime"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and all(line.strip() == line and line for line in lines)
    assert not any(line.startswith("onnxruntime>") for line in lines)


# --- verify-image.py -----------------------------------------------------------------------

def test_verify_accepts_this_cpu_environment() -> None:
    """The dev environment has the CPU wheel only, as the CPU image must."""
    assert verify.check_runtime_distribution(gpu=False) == []
    assert verify.check_providers(gpu=False) == []
    assert verify.check_service_layout(None) == []


def test_verify_rejects_what_the_gpu_image_must_not_be(monkeypatch: pytest.MonkeyPatch) -> None:
    assert verify.check_runtime_distribution(gpu=True) == ["onnxruntime-gpu is not installed"]
    assert verify.check_providers(gpu=True)  # the CPU wheel has no CUDA provider
    monkeypatch.setattr(verify, "installed", lambda dist: True)
    assert "both onnxruntime and onnxruntime-gpu are installed" in \
        verify.check_runtime_distribution(gpu=True)


def test_verify_flags_torch_and_missing_model(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    monkeypatch.setattr(verify.importlib.util, "find_spec",
                        lambda name: object() if name == "torch" else None)
    assert verify.check_no_torch() == ["torch is importable: the runtime image must not ship it"]
    problems = verify.check_service_layout(tmp_path / "no-model")
    assert problems == [f"no model manifest at {tmp_path / 'no-model' / 'manifest.json'}"]


# --- healthcheck.py ------------------------------------------------------------------------

@pytest.mark.parametrize(("cmdline", "component"), [
    (["tini", "--", "triage", "scp"], "scp"),
    (["/opt/venv/bin/python", "/opt/venv/bin/triage", "web", "--port", "9000"], "web"),
    (["tini", "--", "triage", "worker"], "worker"),
    (["tini", "--", "triage", "db", "upgrade"], None),
    ([], None),
])
def test_detect_component(cmdline: list[str], component: str | None) -> None:
    assert healthcheck.detect_component(cmdline) == component


def test_pid1_cmdline_reads_nul_separated(tmp_path: Path) -> None:
    proc = tmp_path / "cmdline"
    proc.write_bytes(b"tini\0--\0triage\0scp\0")
    assert healthcheck.pid1_cmdline(proc) == ["tini", "--", "triage", "scp"]
    assert healthcheck.pid1_cmdline(tmp_path / "absent") == []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def http_server() -> Iterator[tuple[int, dict[str, int]]]:
    """A real HTTP server whose /healthz answers the status in ``state['status']``."""
    state = {"status": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            self.send_response(state["status"] if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], state
    server.shutdown()
    server.server_close()


def test_http_probe_follows_healthz(http_server: tuple[int, dict[str, int]]) -> None:
    port, state = http_server
    assert healthcheck.check_http("0.0.0.0", port)[0] is True
    state["status"] = 503
    healthy, reason = healthcheck.check_http("0.0.0.0", port)
    assert healthy is False and "503" in reason
    assert healthcheck.check_http("127.0.0.1", _free_port())[0] is False


def test_tcp_probe() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        assert healthcheck.check_tcp("0.0.0.0", listener.getsockname()[1])[0] is True
    assert healthcheck.check_tcp("127.0.0.1", _free_port())[0] is False


def test_broker_probe(redis_url: str) -> None:
    assert healthcheck.check_broker(redis_url) == (True, "broker: PONG")
    assert healthcheck.check_broker(f"redis://127.0.0.1:{_free_port()}/0")[0] is False
    assert healthcheck.check_broker(None)[0] is False


def test_probe_uses_the_settings_ports(monkeypatch: pytest.MonkeyPatch,
                                       http_server: tuple[int, dict[str, int]],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    port, _ = http_server
    monkeypatch.setenv("TRIAGE_WEB_PORT", str(port))
    monkeypatch.setenv("TRIAGE_WEB_HOST", "0.0.0.0")
    assert healthcheck.main(["web"]) == 0
    assert capsys.readouterr().out.startswith("web: healthy")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        monkeypatch.setenv("TRIAGE_DICOM_PORT", str(listener.getsockname()[1]))
        assert healthcheck.main(["scp"]) == 0
    monkeypatch.setenv("TRIAGE_DICOM_PORT", str(_free_port()))
    assert healthcheck.main(["scp"]) == 1
