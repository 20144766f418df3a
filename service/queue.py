"""The doorway to the worker: the Celery app, task names, and enqueue helpers.

The DICOM edge and the web app enqueue by task *name* through this module and never import
``service.worker``, so they do not depend on the model side. Task bodies live in
``service.worker``.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from celery import Celery
from kombu import Queue

from service.config import Settings, get_settings

logger = logging.getLogger(__name__)

ANALYSIS_QUEUE = "analysis"
"""Long, GPU-bound work."""
EXPORT_QUEUE = "export"
"""Short network work: C-STORE of results, notifications."""

TASK_ANALYZE_SERIES = "cspine.analyze_series"
TASK_EXPORT_RESULT = "cspine.export_result"
TASK_NOTIFY = "cspine.notify"

WORKER_KEY_PREFIX = "cspine:worker:"
"""Broker key prefix of the worker heartbeats: each worker process writes
``<prefix><host>:<pid>`` with a TTL (``service.worker``), ``service.health`` reads them by
:data:`WORKER_KEY_PATTERN`, so the web side needs no import of the worker."""
WORKER_KEY_PATTERN = WORKER_KEY_PREFIX + "*"


class BrokerNotConfigured(RuntimeError):
    """No broker URL: ``triage serve`` provides one; standalone processes must be told."""


def make_celery(settings: Settings) -> Celery:
    """Build the Celery app with the reliability settings the pipeline relies on.

    ``acks_late`` + prefetch 1 + ``reject_on_worker_lost``: a worker killed mid-task leaves the
    message unacknowledged, so the broker redelivers it; tasks are idempotent, so a redelivery
    completes the work exactly once.
    """
    if not settings.broker_url:
        raise BrokerNotConfigured("TRIAGE_BROKER_URL is not set")
    app = Celery("cspine", broker=settings.broker_url,
                 backend=settings.result_backend_url or None)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=ANALYSIS_QUEUE,
        task_queues=(Queue(ANALYSIS_QUEUE), Queue(EXPORT_QUEUE)),
        task_routes={
            TASK_ANALYZE_SERIES: {"queue": ANALYSIS_QUEUE},
            TASK_EXPORT_RESULT: {"queue": EXPORT_QUEUE},
            TASK_NOTIFY: {"queue": EXPORT_QUEUE},
        },
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_time_limit_s,
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        broker_connection_timeout=settings.broker_connect_timeout_s,
        broker_connection_retry_on_startup=True,
        # Redelivery of an unacked task after a lost worker: must exceed the hard time limit.
        broker_transport_options={
            "visibility_timeout": settings.broker_visibility_timeout_s,
            "socket_connect_timeout": settings.broker_connect_timeout_s,
            "socket_timeout": 10,
        },
        worker_hijack_root_logger=False,
        timezone="UTC",
        enable_utc=True,
    )
    return app


@lru_cache(maxsize=1)
def get_celery() -> Celery:
    return make_celery(get_settings())


def enqueue_analysis(app: Celery, analysis_id: int) -> str:
    """Send one analysis to the analysis queue; returns the task id.

    Call only after the transaction that created the analysis row has committed, so the
    worker always finds it. Raises kombu/redis errors when the broker is down: the caller keeps
    the analysis PENDING and retries later.
    """
    result = app.send_task(TASK_ANALYZE_SERIES, args=[analysis_id], queue=ANALYSIS_QUEUE,
                           retry=False)
    return str(result.id)


def enqueue_export(app: Celery, analysis_id: int) -> str:
    """Send an analysis's result objects to its destinations (rows planned in ``export``)."""
    result = app.send_task(TASK_EXPORT_RESULT, args=[analysis_id], queue=EXPORT_QUEUE,
                           retry=False)
    return str(result.id)
