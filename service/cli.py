"""The ``triage`` command.

Subcommands run one part each (``scp``, ``worker``, ``web``) for production, or everything
at once (``serve``) on embedded defaults: SQLite, files under ``./var/``, and a redis-server
started here when no broker is configured.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from types import FrameType

from service.config import Settings, child_environment, get_settings
from service.dicom import cli as dicom_cli
from service.evaluation import cli as evaluation_cli
from service.logs import configure as configure_logging
from service.synthetic import cli as synthetic_cli

logger = logging.getLogger(__name__)

# Parts that `triage serve` supervises, each run as `triage <name>` in its own process.
# The SCP and the worker join this list as they land.
SERVE_COMPONENTS: tuple[str, ...] = ("web", "scp", "worker")

Handler = Callable[[argparse.Namespace, Settings], int]


def cmd_config_show(args: argparse.Namespace, settings: Settings) -> int:
    print(json.dumps(settings.masked(), indent=2, sort_keys=True))
    return 0


def cmd_db_upgrade(args: argparse.Namespace, settings: Settings) -> int:
    from service.db import migrate

    migrate.upgrade(settings.db_url, args.revision)
    print(f"database at {args.revision}")
    return 0


def cmd_db_current(args: argparse.Namespace, settings: Settings) -> int:
    from service.db import migrate
    from service.db.session import make_engine

    engine = make_engine(settings.db_url)
    print(json.dumps({"current": migrate.current_revision(engine),
                      "head": migrate.head_revision(settings.db_url)}))
    engine.dispose()
    return 0


def cmd_web(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from service.web.app import InsecureConfiguration, create_app

    try:
        app = create_app(settings)
    except InsecureConfiguration as exc:
        print(f"triage web: refusing to start: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=args.host or settings.web_host,
                port=args.port or settings.web_port, log_level=settings.log_level.lower())
    return 0


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    from service.queue import ANALYSIS_QUEUE, EXPORT_QUEUE
    from service.worker import run_worker

    queues = args.queues.split(",") if args.queues else [ANALYSIS_QUEUE, EXPORT_QUEUE]
    run_worker(settings, queues=queues, concurrency=args.concurrency, pool=args.pool,
               hostname=args.hostname)
    return 0


def cmd_analysis_retry(args: argparse.Namespace, settings: Settings) -> int:
    """Admin: put a FAILED or NOT_ANALYZABLE analysis back on the queue."""
    from service.db.session import make_engine, make_session_factory, session_scope
    from service.queue import enqueue_analysis, get_celery
    from service.worker import retry_analysis

    engine = make_engine(settings.db_url)
    with session_scope(make_session_factory(engine)) as session:
        retry_analysis(session, args.analysis_id, actor=args.actor)
    task_id = enqueue_analysis(get_celery(), args.analysis_id)
    engine.dispose()
    print(json.dumps({"analysis_id": args.analysis_id, "task_id": task_id}))
    return 0


def cmd_audit_verify(args: argparse.Namespace, settings: Settings) -> int:
    """Exit 1 when a link is broken or an anchor is not reproduced (the JSON says which)."""
    from pathlib import Path

    from service.audit import read_anchors, verify_chain
    from service.db.session import make_engine, make_session_factory

    anchor_file = Path(args.anchors) if args.anchors else settings.audit_anchor_path
    anchors = [] if args.no_anchors else read_anchors(anchor_file)
    engine = make_engine(settings.db_url)
    with make_session_factory(engine)() as session:
        report = verify_chain(session, anchors)
    engine.dispose()
    out = report.as_dict()
    out["anchor_file"] = None if args.no_anchors else str(anchor_file)
    print(json.dumps(out))
    return 0 if report.intact else 1


def cmd_audit_anchor(args: argparse.Namespace, settings: Settings) -> int:
    """Append the chain head to the anchor file (and the log); run it from cron or a timer."""
    from pathlib import Path

    from service.audit import write_anchor
    from service.db.session import make_engine, make_session_factory

    anchor_file = Path(args.anchors) if args.anchors else settings.audit_anchor_path
    engine = make_engine(settings.db_url)
    with make_session_factory(engine)() as session:
        anchor = write_anchor(session, anchor_file)
    engine.dispose()
    print(json.dumps({"anchor_file": str(anchor_file),
                      "event_id": anchor.event_id if anchor else None,
                      "hash": anchor.hash if anchor else None}))
    return 0


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    """Supervise every component; Ctrl-C (SIGINT) or SIGTERM stops them all, broker last."""
    from service.db import migrate
    from service.embedded import EmbeddedRedis, persistent_secret_key

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    migrate.upgrade(settings.db_url)
    embedded: EmbeddedRedis | None = None
    overrides: dict[str, str] = {"database_url": settings.db_url}
    if settings.secret_key_is_placeholder and not settings.development_mode:
        overrides["secret_key"] = persistent_secret_key(settings.data_dir / "secret-key")
    if not settings.broker_url:
        embedded = EmbeddedRedis(settings.data_dir / "redis")
        embedded.start()
        overrides["broker_url"] = embedded.url
    env = child_environment(settings, **overrides)
    components = [c for c in SERVE_COMPONENTS if c not in (args.without or [])]
    children: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def _stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for name in components:
            children[name] = subprocess.Popen([sys.executable, "-m", "service.cli", name],
                                              env=env)
            logger.info("started %s (pid %d)", name, children[name].pid)
        print(f"cspine-triage serving: {', '.join(components)}; web on "
              f"http://{settings.web_host}:{settings.web_port}; Ctrl-C stops", flush=True)
        exit_code = 0
        while not stopping:
            for name, child in children.items():
                if child.poll() is not None:
                    logger.error("%s exited with %s; stopping the service", name,
                                 child.returncode)
                    exit_code = 1
                    stopping = True
            time.sleep(0.2)
        return exit_code
    finally:
        for child in children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for name, child in children.items():
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in time; killing it", name)
                child.kill()
                child.wait()
        if embedded:
            embedded.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        print("cspine-triage stopped", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="triage", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run every component on embedded defaults")
    serve.add_argument("--without", action="append", choices=list(SERVE_COMPONENTS),
                       help="leave a component out (repeatable)")
    serve.set_defaults(handler=cmd_serve)

    web = sub.add_parser("web", help="run the web dashboard and API")
    web.add_argument("--host")
    web.add_argument("--port", type=int)
    web.set_defaults(handler=cmd_web)

    config = sub.add_parser("config", help="settings").add_subparsers(dest="action",
                                                                     required=True)
    config.add_parser("show", help="print the effective settings, secrets masked") \
        .set_defaults(handler=cmd_config_show)

    db = sub.add_parser("db", help="database schema").add_subparsers(dest="action",
                                                                    required=True)
    upgrade = db.add_parser("upgrade", help="apply Alembic migrations")
    upgrade.add_argument("revision", nargs="?", default="head")
    upgrade.set_defaults(handler=cmd_db_upgrade)
    db.add_parser("current", help="show current and head revisions") \
        .set_defaults(handler=cmd_db_current)

    worker = sub.add_parser("worker", help="run a Celery worker (analysis and export queues)")
    worker.add_argument("--queues", help="comma-separated queues (default: analysis,export)")
    worker.add_argument("--concurrency", type=int)
    worker.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"])
    worker.add_argument("--hostname")
    worker.set_defaults(handler=cmd_worker)

    analysis = sub.add_parser("analysis", help="analyses").add_subparsers(dest="action",
                                                                         required=True)
    retry = analysis.add_parser("retry", help="re-queue a FAILED / NOT_ANALYZABLE analysis")
    retry.add_argument("analysis_id", type=int)
    retry.add_argument("--actor", default="admin-cli")
    retry.set_defaults(handler=cmd_analysis_retry)

    audit = sub.add_parser("audit", help="audit trail").add_subparsers(dest="action",
                                                                      required=True)
    verify = audit.add_parser("verify", help="verify the hash chain and its anchors; names "
                                             "the first broken link")
    verify.add_argument("--anchors", help="anchor file (default: TRIAGE_AUDIT_ANCHOR_FILE)")
    verify.add_argument("--no-anchors", action="store_true",
                        help="check the chain alone (a re-chained rewrite then passes)")
    verify.set_defaults(handler=cmd_audit_verify)
    anchor = audit.add_parser("anchor", help="append the chain head to the anchor file")
    anchor.add_argument("--anchors", help="anchor file (default: TRIAGE_AUDIT_ANCHOR_FILE)")
    anchor.set_defaults(handler=cmd_audit_anchor)

    for register in EXTRA_COMMANDS:
        register(sub)
    return parser


# Later components register their subcommands here: each entry takes the subparsers object.
EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    dicom_cli.register,
    evaluation_cli.register,
    evaluation_cli.register_real,  # triage evaluate-real
    synthetic_cli.register,
    __import__("service.web.cli", fromlist=["register"]).register,  # triage user, token
]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = get_settings()
    configure_logging(settings.log_level)
    handler: Handler = args.handler
    return handler(args, settings)


if __name__ == "__main__":
    sys.exit(main())
