"""The one place that reads the environment.

Every knob of the service lives on :class:`Settings`. Values come, highest priority first,
from keyword arguments (tests), ``TRIAGE_*`` environment variables, a ``.env`` file, and an
optional YAML or TOML config file named by ``TRIAGE_CONFIG_FILE``. No other module may call
``os.environ``; a process that needs to hand settings to a child process passes them as
``TRIAGE_*`` variables through :func:`child_environment`.
"""

from __future__ import annotations

import ipaddress
import os
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from service import shipped

ENV_PREFIX = "TRIAGE_"
CONFIG_FILE_VARIABLE = "TRIAGE_CONFIG_FILE"
PLACEHOLDER_SECRET_KEY = "change-me-in-production"
"""The shipped ``secret_key``: public, so the web app refuses it outside development mode."""


class SegFormat(StrEnum):
    """How a destination wants the segmentation: BINARY is what most PACS accept."""

    BINARY = "BINARY"
    LABELMAP = "LABELMAP"


class SegEncoding(StrEnum):
    """How SEG frames are encoded (``TRIAGE_SEG_ENCODING``).

    NATIVE (default): BINARY frames uncompressed (bit-packed Explicit VR Little Endian, which
    every Storage SCP accepts), LABELMAP frames RLE Lossless: about 3x faster to build than
    JPEG 2000 on a CPU and a few MB for a 300-slice series. JPEG2000: both JPEG 2000 lossless,
    the smallest objects, for a site that pays for bytes more than for seconds.
    """

    NATIVE = "NATIVE"
    JPEG2000 = "JPEG2000"


class PacsDestination(BaseModel):
    """A DICOM peer that receives our SR/SEG (C-STORE SCU)."""

    name: str | None = None
    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    tls: bool = False
    seg_format: SegFormat = SegFormat.BINARY

    @property
    def label(self) -> str:
        return self.name or f"{self.ae_title}@{self.host}:{self.port}"


def _split_csv(value: Any) -> Any:
    """Accept ``A,B`` as well as a JSON list for list-valued settings from the environment."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return []
        if text.startswith("["):
            import json

            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


CsvList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    """Effective configuration of one process. Secrets are ``SecretStr`` and masked in output."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    development_mode: bool = False
    """Allow what must never run in production: the placeholder ``secret_key`` (the web app
    refuses it otherwise) and a plain-http or unsigned webhook. ``triage serve`` needs no
    development mode: it makes and keeps a random key under ``data_dir``."""

    # --- storage -----------------------------------------------------------------------
    data_dir: Path = Path("var")
    """Root of everything the service writes: spool, results, embedded broker, SQLite file."""
    spool_dir: Path | None = None
    """Durable spool of received instances; defaults to ``<data_dir>/spool``."""
    results_dir: Path | None = None
    """Where SR/SEG objects are stored before export; defaults to ``<data_dir>/results``."""

    # --- database and broker ---------------------------------------------------------------
    database_url: str | None = None
    """SQLAlchemy URL. Default: SQLite at ``<data_dir>/triage.db`` (WAL mode)."""
    broker_url: str | None = None
    """Redis URL for Celery. ``None``: ``triage serve`` starts an embedded redis-server."""
    result_backend_url: str | None = None
    broker_connect_timeout_s: float = 2.0

    # --- DICOM edge ------------------------------------------------------------------------
    ae_title: str = "CSPINE_TRIAGE"
    dicom_host: str = "127.0.0.1"
    """Listen address of the SCP. Loopback by default: receiving from a PACS is a decision
    (``0.0.0.0`` or one interface, with ``allowed_calling_aes``/``allowed_networks`` and TLS);
    the container images set ``0.0.0.0``, where the pod/compose network is the boundary."""
    dicom_port: int = Field(default=11112, ge=1, le=65535)
    require_called_ae: bool = True
    """Reject associations whose Called AE Title is not ours."""
    allowed_calling_aes: CsvList = Field(default_factory=list)
    """Calling AE titles allowed to associate; empty means any."""
    allowed_networks: CsvList = Field(default_factory=list)
    """IP addresses or CIDR networks allowed to associate; empty means any."""
    max_pdu_size: int = Field(default=0, ge=0)
    """Maximum PDU size we accept (bytes); 0 means unlimited."""
    dimse_timeout_s: float = 30.0
    network_timeout_s: float = 60.0
    acse_timeout_s: float = 30.0
    scp_processes: int = Field(default=1, ge=1)
    """Receiver processes sharing the DICOM port (SO_REUSEPORT)."""
    tls_enabled: bool = False
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_ca_file: Path | None = None
    """When set, peers must present a certificate signed by this CA (mutual TLS)."""
    ingest_batch_interval_s: float = 0.2
    """How often buffered instance rows are flushed to the database by the SCP."""
    max_inflated_dataset_mb: int = Field(default=512, ge=1)
    """Largest size a C-STORE in a Deflated transfer syntax may inflate to; beyond it the SCP
    answers 0xC210 while inflating, before the rest is allocated (a decompression bomb: one
    megabyte of deflated zeros is a gigabyte inflated). Deflate carries SR and small images
    in practice, far below the default 512 MiB."""
    spool_min_free_mb: int = Field(default=256, ge=0)
    """Answer C-STORE with 0xA700 (out of resources) when the spool filesystem has less free
    space than this, instead of filling the disk the database and the OS also need."""
    spool_fsync_directory: bool = False
    """Also fsync the series directory after each instance (POSIX-strict). Off by default: the
    spool links the file under its name *before* its single fsync, and on ext4, XFS, btrfs
    and NFS that fsync makes the name durable with the data; turn it on for other file
    systems."""

    # --- series completion and qualification --------------------------------------------
    completion_idle_after_release_s: float = 5.0
    """Complete a series this long after its association was released, if nothing came."""
    completion_idle_s: float = 30.0
    """Complete a series this long after its last instance, whatever the associations did."""
    expected_instances_hint: int | None = None
    """When set, a series with this many instances is complete at once."""
    completion_use_images_in_acquisition: bool = True
    """Take Images in Acquisition (0020,1002) as the expected instance count of a series."""
    tracker_interval_s: float = Field(default=0.5, gt=0)
    """How often the completeness tracker looks for series due and analyses to enqueue."""
    enqueue_retry_interval_s: float = Field(default=5.0, gt=0)
    """After a failed enqueue (broker down), wait this long before trying the broker again."""
    rules_file: Path | None = None
    """YAML file with qualification rules; default: the packaged rules."""
    max_slice_thickness_mm: float = 3.0
    min_slices: int = 20
    max_gantry_tilt_deg: float = Field(default=30.0, ge=0.0, le=60.0)
    """Gantry tilts up to this are resampled to an axial grid; larger ones are refused."""
    max_volume_voxels: int = Field(default=1 << 30, ge=1)
    """Largest series the worker loads, in voxels (slices x Rows x Columns): a larger one is
    refused as ``VOLUME_TOO_LARGE`` from its headers, before any pixel array is allocated.
    Rows and Columns are whatever the sender wrote (up to 65535 each), so without a bound a
    hostile or broken header makes the worker allocate tens of gigabytes. The default, 2**30
    (2 GiB of int16 HU, 4 GiB of float32), holds 4096 slices of 512 x 512 or 1024 of
    1024 x 1024, far beyond a cervical-spine CT."""
    dicom_timezone: str = "UTC"
    """IANA timezone of naive DICOM dates/times (Timezone Offset From UTC in a header wins)."""

    # --- model and inference ----------------------------------------------------------------
    model_dir: Path = Field(default_factory=shipped.model_dir)
    """The model's artifacts (manifest.json, ONNX files); default: the shipped cspine-v1, as an
    absolute path, in a checkout or an installed wheel (``service/shipped.py``)."""
    execution_providers: CsvList = Field(
        default_factory=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    """ONNX Runtime providers in order of preference; unavailable ones are skipped."""
    ort_intra_op_threads: int = Field(default=0, ge=0)
    """CPU provider threads; 0 lets ONNX Runtime decide."""
    ort_inter_op_threads: int = Field(default=1, ge=0)
    cuda_device_id: int = 0
    use_fp16: bool = False
    """Use the fp16 model variant where the manifest offers one (GPU only)."""
    fracture_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    """Override of the manifest's per-vertebra decision threshold."""
    patient_threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    """Override of the manifest's patient-level decision threshold."""

    # --- worker ---------------------------------------------------------------------------
    worker_concurrency: int = Field(default=1, ge=1)
    task_soft_time_limit_s: int = 300
    task_time_limit_s: int = 360
    task_max_retries: int = 3
    task_retry_backoff_s: int = 5
    broker_visibility_timeout_s: int = 3600
    """Seconds before a task taken by a worker that died unacknowledged is delivered again."""

    # --- results and export ----------------------------------------------------------------
    uid_root: str = "1.2.826.0.1.3680043.10.1455."
    """Root under which result UIDs are derived deterministically (must end with a dot)."""
    pacs_destinations: list[PacsDestination] = Field(default_factory=list)
    """JSON list of objects with ``ae_title``, ``host``, ``port`` (``TRIAGE_PACS_DESTINATIONS``)."""
    stow_rs_url: str | None = None
    secondary_capture: bool = False
    """Also send a Secondary Capture key image, for viewers without SR/SEG support."""
    seg_encoding: SegEncoding = SegEncoding.NATIVE
    """SEG frame encoding: NATIVE (fast) or JPEG2000 (small); see :class:`SegEncoding`."""
    export_max_retries: int = 8
    """Tries per object and destination before FAILED. With the 10 s base backoff (doubling,
    each wait capped at 600 s) 8 tries span 21 minutes, so a PACS down for 10 minutes gets
    its results without an operator (5 tries spanned 150 s). The waits are in the broker,
    not in a worker process."""
    export_retry_backoff_s: int = 10
    export_timeout_s: float = 30.0

    # --- worklist and notification ----------------------------------------------------------
    priority_when_suspected: str = "STAT"
    """Worklist priority of a study with any vertebra suspected (a ``Priority`` name)."""
    priority_when_negative: str = "ROUTINE"
    """Worklist priority of an analysed study with no suspected vertebra."""
    priority_urgent_probability: float | None = Field(default=None, ge=0.0, le=1.0)
    """When set, a study not suspected but with patient probability >= this goes URGENT."""
    hl7_host: str | None = None
    hl7_port: int | None = None
    hl7_tls: bool = False
    """Send HL7 over MLLP inside TLS (1.2+), verifying the peer's certificate and name."""
    hl7_tls_ca_file: Path | None = None
    """CA bundle the HL7 peer's certificate must chain to; ``None``: the system's CAs."""
    hl7_tls_cert_file: Path | None = None
    """Our client certificate, for a peer that asks for one (mutual TLS)."""
    hl7_tls_key_file: Path | None = None
    webhook_url: str | None = None
    """https only (plain http only in ``development_mode``)."""
    webhook_secret: SecretStr | None = None
    """Key of the HMAC-SHA256 over each webhook body (header ``X-Triage-Signature-256:
    sha256=<hex>``); required with ``webhook_url`` outside ``development_mode``."""
    webhook_ca_file: Path | None = None
    """CA bundle the webhook receiver's certificate must chain to; ``None``: system CAs."""

    # --- web ---------------------------------------------------------------------------------
    web_host: str = "127.0.0.1"
    web_port: int = Field(default=8000, ge=1, le=65535)
    secret_key: SecretStr = SecretStr(PLACEHOLDER_SECRET_KEY)
    """Signs the session cookies; the web app refuses the placeholder outside
    ``development_mode``."""
    session_max_age_s: int = 8 * 3600
    metrics_token: SecretStr | None = None
    """Bearer token a Prometheus scraper sends to ``/metrics``. Unset: ``/metrics`` answers
    only an admin (session or an admin's API token), never an anonymous caller."""

    # --- audit and logging ------------------------------------------------------------------
    audit_syslog_host: str | None = None
    """IHE ATNA collector: the audit trail goes there as DICOM PS3.15 A.5 messages over RFC
    5424 syslog in TLS (``service.audit.atna``); unset: not sent."""
    audit_syslog_port: int = Field(default=6514, ge=1, le=65535)
    """6514 is syslog over TLS (RFC 5425)."""
    audit_syslog_tls_ca_file: Path | None = None
    """CA bundle the collector's certificate must chain to; ``None``: the system's CAs."""
    audit_syslog_tls_cert_file: Path | None = None
    """This node's certificate (ATNA authenticates both ends), with its key below."""
    audit_syslog_tls_key_file: Path | None = None
    audit_syslog_interval_s: float = Field(default=2.0, gt=0)
    """How often the SCP's tracker sends the audit events committed since the last send."""
    audit_anchor_file: Path | None = None
    """JSON-lines file the audit chain head is appended to (``triage audit anchor``, and the
    SCP every ``audit_anchor_interval_s``); defaults to ``<data_dir>/audit-anchors.jsonl``.
    Point it at storage the database's administrators cannot write, or copy it there:
    ``triage audit verify`` checks the chain against it."""
    audit_anchor_interval_s: float = Field(default=3600.0, ge=0)
    """How often the SCP process anchors the audit chain head; 0: only on command."""
    log_level: str = "INFO"

    # --- dashboard (login, worklist, study page) --------------------------------------------
    session_cookie_secure: bool | None = None
    """Mark the session cookie Secure; ``None``: when the request came over TLS (https)."""
    login_max_failures: int = Field(default=5, ge=1)
    """Failed logins of one user within ``login_window_s`` that lock the account."""
    login_lockout_s: int = Field(default=900, ge=1)
    """How long a locked account stays locked after its last failed attempt."""
    login_ip_max_failures: int = Field(default=20, ge=1)
    """Failed logins from one address within ``login_window_s`` before it is refused (429)."""
    login_window_s: int = Field(default=900, ge=1)
    worklist_poll_s: float = Field(default=3.0, gt=0)
    """How often an open worklist page asks whether anything changed."""
    viewer_url_template: str | None = None
    """Deep link into the site's viewer; ``{study_instance_uid}``, ``{series_instance_uid}``
    and ``{accession_number}`` are substituted (URL-encoded), e.g.
    ``https://ohif.example/viewer?StudyInstanceUIDs={study_instance_uid}``."""
    turnaround_band_s: tuple[float, float] = (180.0, 480.0)
    """The reference band (3-8 minutes) the study page's timeline is shown against."""
    turnaround_target_s: float = Field(default=480.0, gt=0)
    """Acquisition -> flag target: a study over it is a breach on the admin's turnaround
    page (default 8 minutes, the slow end of the commercial reference)."""

    @field_validator("allowed_calling_aes", "allowed_networks", "execution_providers",
                     mode="before")
    @classmethod
    def _lists_from_csv(cls, value: Any) -> Any:
        return _split_csv(value)

    @field_validator("allowed_networks")
    @classmethod
    def _networks_parse(cls, value: list[str]) -> list[str]:
        for item in value:
            ipaddress.ip_network(item, strict=False)
        return value

    @field_validator("dicom_timezone")
    @classmethod
    def _timezone_known(cls, value: str) -> str:
        if value.strip().upper() in ("UTC", "Z", "GMT", "ETC/UTC"):
            return value
        from zoneinfo import ZoneInfo

        try:
            ZoneInfo(value)
        except Exception as exc:  # ZoneInfoNotFoundError is a KeyError, not a ValueError
            raise ValueError(f"unknown timezone {value!r}: {exc}") from exc
        return value

    @field_validator("uid_root")
    @classmethod
    def _uid_root_form(cls, value: str) -> str:
        if not value.endswith(".") or len(value) > 40:
            raise ValueError("uid_root must end with '.' and leave room for a suffix (<= 40 chars)")
        if not all(part.isdigit() for part in value.rstrip(".").split(".")):
            raise ValueError("uid_root must be dotted decimal")
        return value

    @model_validator(mode="after")
    def _derive_paths(self) -> Settings:
        if self.spool_dir is None:
            self.spool_dir = self.data_dir / "spool"
        if self.results_dir is None:
            self.results_dir = self.data_dir / "results"
        if self.database_url is None:
            self.database_url = f"sqlite:///{(self.data_dir / 'triage.db').as_posix()}"
        if self.audit_anchor_file is None:
            self.audit_anchor_file = self.data_dir / "audit-anchors.jsonl"
        if self.tls_enabled and not (self.tls_cert_file and self.tls_key_file):
            raise ValueError("tls_enabled needs tls_cert_file and tls_key_file")
        if bool(self.hl7_tls_cert_file) != bool(self.hl7_tls_key_file):
            raise ValueError("hl7_tls_cert_file and hl7_tls_key_file go together")
        if self.webhook_url and not self.development_mode:
            from urllib.parse import urlsplit

            if urlsplit(self.webhook_url).scheme.lower() != "https":
                raise ValueError("webhook_url must be https (plain http only in "
                                 "development_mode): the payload names studies")
            if self.webhook_secret is None or not self.webhook_secret.get_secret_value():
                raise ValueError("webhook_url needs webhook_secret (the receiver checks the "
                                 "HMAC signature) outside development_mode")
        return self

    @property
    def secret_key_is_placeholder(self) -> bool:
        return self.secret_key.get_secret_value() == PLACEHOLDER_SECRET_KEY

    # Typed accessors for the derived paths, so callers need no ``assert ... is not None``.
    @property
    def spool_path(self) -> Path:
        assert self.spool_dir is not None
        return self.spool_dir

    @property
    def results_path(self) -> Path:
        assert self.results_dir is not None
        return self.results_dir

    @property
    def audit_anchor_path(self) -> Path:
        assert self.audit_anchor_file is not None
        return self.audit_anchor_file

    @property
    def db_url(self) -> str:
        assert self.database_url is not None
        return self.database_url

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        config_file = os.environ.get(CONFIG_FILE_VARIABLE)
        if config_file:
            path = Path(config_file)
            if not path.is_file():
                raise FileNotFoundError(f"{CONFIG_FILE_VARIABLE}={config_file}: no such file")
            if path.suffix.lower() == ".toml":
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            else:
                sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        sources.append(file_secret_settings)
        return tuple(sources)

    def masked(self) -> dict[str, Any]:
        """Effective settings as JSON-able data with secrets and URL passwords masked."""
        data = self.model_dump(mode="json")
        for name, field in type(self).model_fields.items():
            if field.annotation is SecretStr or "SecretStr" in str(field.annotation):
                data[name] = "**********" if data.get(name) else None
        for key in ("database_url", "broker_url", "result_backend_url", "stow_rs_url",
                    "webhook_url"):
            if data.get(key):
                data[key] = _mask_url_password(data[key])
        return data


def _mask_url_password(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":****@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings, read once. Tests build their own ``Settings(...)`` instead."""
    return Settings()


def child_environment(settings: Settings, **overrides: str) -> dict[str, str]:
    """Environment for a child process that must see the same settings as this one.

    Explicit ``TRIAGE_*`` values override inherited ones, so a supervisor (``triage serve``)
    can hand the embedded broker URL to the processes it starts.
    """
    env = dict(os.environ)
    for key, value in overrides.items():
        env[f"{ENV_PREFIX}{key.upper()}"] = value
    return env
