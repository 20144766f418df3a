"""Who may associate: called-AE check, calling-AE and IP allowlists, and TLS.

Rejections use the A-ASSOCIATE-RJ reasons of PS3.8 9.3.4 that a peer's log shows plainly:
"called AE title not recognized" (1, 1, 7), "calling AE title not recognized" (1, 1, 3), and
"no reason given" (1, 1, 1) for an address outside the allowlist, which is deliberately not
spelled out to the peer (the audit trail records the real reason).
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from dataclasses import dataclass
from enum import StrEnum

from service.config import Settings

logger = logging.getLogger(__name__)


class RejectReason(StrEnum):
    CALLED_AE_UNKNOWN = "CALLED_AE_UNKNOWN"
    CALLING_AE_NOT_ALLOWED = "CALLING_AE_NOT_ALLOWED"
    ADDRESS_NOT_ALLOWED = "ADDRESS_NOT_ALLOWED"


@dataclass(frozen=True)
class Rejection:
    reason: RejectReason
    result: int
    """1 = rejected permanent, 2 = transient."""
    source: int
    """1 = service user."""
    diagnostic: int


_REJECTIONS = {
    RejectReason.CALLED_AE_UNKNOWN: Rejection(RejectReason.CALLED_AE_UNKNOWN, 1, 1, 7),
    RejectReason.CALLING_AE_NOT_ALLOWED: Rejection(RejectReason.CALLING_AE_NOT_ALLOWED, 1, 1, 3),
    RejectReason.ADDRESS_NOT_ALLOWED: Rejection(RejectReason.ADDRESS_NOT_ALLOWED, 1, 1, 1),
}

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class AccessPolicy:
    """Immutable access rules; empty allowlists allow everyone."""

    ae_title: str
    require_called_ae: bool = True
    allowed_calling_aes: frozenset[str] = frozenset()
    allowed_networks: tuple[Network, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> AccessPolicy:
        return cls(
            ae_title=settings.ae_title.strip(),
            require_called_ae=settings.require_called_ae,
            allowed_calling_aes=frozenset(ae.strip() for ae in settings.allowed_calling_aes
                                          if ae.strip()),
            allowed_networks=tuple(ipaddress.ip_network(n, strict=False)
                                   for n in settings.allowed_networks),
        )

    def check(self, called_ae: str, calling_ae: str, address: str) -> Rejection | None:
        """``None`` if the association may proceed, else why not (address checked first)."""
        if self.allowed_networks and not self.address_allowed(address):
            return _REJECTIONS[RejectReason.ADDRESS_NOT_ALLOWED]
        if self.require_called_ae and called_ae.strip() != self.ae_title:
            return _REJECTIONS[RejectReason.CALLED_AE_UNKNOWN]
        if self.allowed_calling_aes and calling_ae.strip() not in self.allowed_calling_aes:
            return _REJECTIONS[RejectReason.CALLING_AE_NOT_ALLOWED]
        return None

    def address_allowed(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip.version == net.version and ip in net for net in self.allowed_networks)


def exposure_warning(settings: Settings, host: str) -> str | None:
    """Why a listener bound to ``host`` would take C-STOREs from anyone who reaches it, or
    ``None``. Loopback, mutual TLS (``tls_ca_file``) or an address allowlist close it; a
    calling-AE allowlist alone does not (an AE title is a name any peer can claim)."""
    try:
        loopback = ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback or (settings.tls_enabled and settings.tls_ca_file) or settings.allowed_networks:
        return None
    return (f"DICOM listener on {host} accepts any peer that can reach it: set "
            "TRIAGE_ALLOWED_NETWORKS, or TLS with TRIAGE_TLS_CA_FILE (mutual TLS)")


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of the SCP, or ``None`` when TLS is off.

    TLS 1.2 or newer. With ``tls_ca_file`` the peer must present a certificate signed by that
    CA (mutual TLS, as the DICOM secure transport profiles expect between sites).
    """
    if not settings.tls_enabled:
        return None
    assert settings.tls_cert_file is not None and settings.tls_key_file is not None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=str(settings.tls_cert_file),
                            keyfile=str(settings.tls_key_file))
    if settings.tls_ca_file is not None:
        context.load_verify_locations(cafile=str(settings.tls_ca_file))
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    return context
