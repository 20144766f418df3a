"""``triage scp`` and ``triage tracker`` (registered through ``service.cli.EXTRA_COMMANDS``).

Heavy imports (pynetdicom, the ingest machinery) happen inside the handlers, so the other
``triage`` subcommands stay quick to start.
"""

from __future__ import annotations

import argparse
import logging

from service.config import Settings

logger = logging.getLogger(__name__)


def cmd_scp(args: argparse.Namespace, settings: Settings) -> int:
    from service.dicom.runner import NotMigrated, serve_scp

    overrides = {}
    if args.host:
        overrides["dicom_host"] = args.host
    if args.port:
        overrides["dicom_port"] = args.port
    if overrides:
        settings = settings.model_copy(update=overrides)
    try:
        return serve_scp(settings, processes=args.processes, with_tracker=not args.no_tracker,
                         rebuild=not args.no_rebuild)
    except NotMigrated as exc:
        logger.error("%s", exc)
        return 2


def cmd_tracker(args: argparse.Namespace, settings: Settings) -> int:
    from service.dicom.runner import NotMigrated, serve_tracker

    try:
        return serve_tracker(settings)
    except NotMigrated as exc:
        logger.error("%s", exc)
        return 2


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    scp = sub.add_parser("scp", help="run the DICOM Storage SCP (C-ECHO, C-STORE, MPPS)")
    scp.add_argument("--host", help="listen address (default: TRIAGE_DICOM_HOST)")
    scp.add_argument("--port", type=int, help="listen port (default: TRIAGE_DICOM_PORT)")
    scp.add_argument("--processes", type=int,
                     help="receiver processes sharing the port (default: TRIAGE_SCP_PROCESSES)")
    scp.add_argument("--no-tracker", action="store_true",
                     help="do not run the completeness tracker here (run `triage tracker`)")
    scp.add_argument("--no-rebuild", action="store_true",
                     help="skip rebuilding database rows from the spool at start")
    scp.set_defaults(handler=cmd_scp)

    tracker = sub.add_parser("tracker", help="run only the series completeness tracker")
    tracker.set_defaults(handler=cmd_tracker)
