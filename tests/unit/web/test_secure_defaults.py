"""Secure by default: the public placeholder secret is refused outside development mode,
``triage serve`` makes its own key, and the DICOM listener stays on loopback unless told."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest

from service.cli import build_parser, cmd_web
from service.config import PLACEHOLDER_SECRET_KEY, Settings
from service.embedded import persistent_secret_key
from service.web.app import InsecureConfiguration, create_app


def test_the_placeholder_secret_is_refused(settings_factory) -> None:  # type: ignore[no-untyped-def]
    settings = settings_factory(secret_key=PLACEHOLDER_SECRET_KEY)
    assert settings.secret_key_is_placeholder and not settings.development_mode
    with pytest.raises(InsecureConfiguration, match="TRIAGE_SECRET_KEY"):
        create_app(settings)


def test_triage_web_exits_with_the_reason(settings_factory,  # type: ignore[no-untyped-def]
                                          capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["web"])
    assert cmd_web(args, settings_factory(secret_key=PLACEHOLDER_SECRET_KEY)) == 2
    assert "refusing to start" in capsys.readouterr().err


def test_development_mode_allows_it_with_a_warning(settings_factory,  # type: ignore[no-untyped-def]
                                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="service.web.app"):
        app = create_app(settings_factory(secret_key=PLACEHOLDER_SECRET_KEY,
                                          development_mode=True))
    assert app.state.settings.development_mode
    assert "placeholder" in caplog.text


def test_a_configured_secret_starts_quietly(settings_factory,  # type: ignore[no-untyped-def]
                                           caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="service.web.app"):
        create_app(settings_factory(secret_key="a-real-secret-of-some-length"))
    assert "placeholder" not in caplog.text


def test_serve_makes_and_keeps_its_own_key(tmp_path: Path) -> None:
    path = tmp_path / "secret-key"
    first = persistent_secret_key(path)
    assert len(first) >= 40 and first != PLACEHOLDER_SECRET_KEY
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert persistent_secret_key(path) == first  # sessions survive a restart
    assert persistent_secret_key(tmp_path / "other") != first


def test_dicom_listener_defaults_to_loopback() -> None:
    assert Settings(_env_file=None).dicom_host == "127.0.0.1"  # type: ignore[call-arg]


@pytest.mark.parametrize(("host", "overrides", "open_to_all"), [
    ("127.0.0.1", {}, False),
    ("::1", {}, False),
    ("0.0.0.0", {}, True),
    ("0.0.0.0", {"allowed_calling_aes": ["PACS"]}, True),  # a name any peer can claim
    ("0.0.0.0", {"allowed_networks": ["10.0.0.0/8"]}, False),
    ("10.1.2.3", {"tls_enabled": True, "tls_cert_file": "c.pem", "tls_key_file": "k.pem"},
     True),  # TLS without a client CA still lets anyone in
    ("10.1.2.3", {"tls_enabled": True, "tls_cert_file": "c.pem", "tls_key_file": "k.pem",
                  "tls_ca_file": "ca.pem"}, False),
])
def test_an_exposed_dicom_listener_is_named(host: str, overrides: dict[str, object],
                                            open_to_all: bool) -> None:
    from service.dicom.security import exposure_warning

    warning = exposure_warning(Settings(**overrides), host)  # type: ignore[arg-type]
    assert (warning is not None) is open_to_all
    if warning:
        assert host in warning and "TRIAGE_ALLOWED_NETWORKS" in warning
