"""The ``hiddenmodel`` command."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from hiddenmodel import logs
from hiddenmodel.memory import tune_malloc
from hiddenmodel.settings import get_settings

log = logging.getLogger("hiddenmodel")


def _cmd_migrate(args: argparse.Namespace) -> int:
    from hiddenmodel.migrate import migrate

    migrate()
    print("database migrated")
    return 0


def _cmd_api(args: argparse.Namespace) -> int:
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    tune_malloc()
    uvicorn.run(
        "hiddenmodel.api.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        proxy_headers=True,
        # The proxies whose X-Forwarded-For/-Proto uvicorn believes are the ones the
        # application believes (HM_TRUSTED_PROXIES): none unless set.
        forwarded_allow_ips=[str(n) for n in get_settings().trusted_proxy_networks()],
        log_level=args.log_level,
        # JSON lines: uvicorn's loggers then go through the root handler (hiddenmodel.logs).
        log_config=None if get_settings().log_format == "json" else LOGGING_CONFIG,
    )
    return 0


def _cmd_openapi(args: argparse.Namespace) -> int:
    from hiddenmodel.api.app import create_app

    print(json.dumps(create_app().openapi(), indent=2, sort_keys=False))
    return 0


def _cmd_sql_functions(args: argparse.Namespace) -> int:
    from sqlalchemy import create_engine, pool

    from hiddenmodel import sqlfunctions

    engine = create_engine(get_settings().database_owner_url, poolclass=pool.NullPool)
    with engine.connect() as conn:
        if args.write:
            for file in sqlfunctions.write_new_versions(conn):
                print(f"wrote {file.path}")
            return 0
        differences = sqlfunctions.differences(conn)
    for name, why in sorted(differences.items()):
        print(f"{name}: {why}")
    return 1 if differences else 0


def _cmd_create_user(args: argparse.Namespace) -> int:
    from hiddenmodel import provisioning

    user_id = asyncio.run(
        provisioning.create_user(args.email, args.password, superuser=args.superuser)
    )
    print(user_id)
    return 0


def _cmd_create_org(args: argparse.Namespace) -> int:
    from hiddenmodel import provisioning

    org_id = asyncio.run(provisioning.create_org(args.slug, args.name, args.owner_email))
    print(org_id)
    return 0


def _cmd_create_api_key(args: argparse.Namespace) -> int:
    from hiddenmodel import provisioning

    token = asyncio.run(provisioning.create_api_key(args.org, args.name, args.scopes))
    print(token)
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    tune_malloc()
    queues = {q.strip() for q in args.queues.split(",") if q.strip()}
    if "gpu" in queues:
        # A GPU worker without its model is refused now, naming what is missing, rather
        # than failing its first job.
        from workers import gpu
        from workers.models import ModelDirError

        try:
            gpu.check_models()
        except ModelDirError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if args.pool != "prefork":
            # No fork ahead: load the models now so the first job does not pay for them.
            gpu.load_models()
        else:
            gpu.load_in_every_pool_process(
                args.concurrency, get_settings().gpu_model_load_timeout_seconds
            )
    from workers.celery_app import app

    argv = [
        "worker",
        "--queues",
        args.queues,
        "--pool",
        args.pool,
        "--concurrency",
        str(args.concurrency),
        "--loglevel",
        args.log_level.upper(),
        "--without-gossip",
        "--without-mingle",
    ]
    if args.hostname:
        argv += ["--hostname", args.hostname]
    if args.prefetch_multiplier is not None:
        argv += ["--prefetch-multiplier", str(args.prefetch_multiplier)]
    if get_settings().log_format == "json":
        # No start-up banner (a global option, before the sub-command): only log records.
        argv.insert(0, "--quiet")
    app.worker_main(argv)
    return 0


def _cmd_dispatcher(args: argparse.Namespace) -> int:
    import signal
    import threading

    from workers.dispatcher import run_forever

    tune_malloc()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    run_forever(stop)
    return 0


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from workers.models.tiny import make_tiny_model

    make_tiny_model(args.dir, segmenters=args.segmenters)
    print(f"wrote a randomly initialised SDXL inpainting pipeline to {args.dir}")
    if args.segmenters:
        print(f"wrote randomly initialised segmenters to {args.dir / 'segmentation'}")
    return 0


def _cmd_webhook_listen(args: argparse.Namespace) -> int:
    from hiddenmodel.webhooks.listen import listen
    from hiddenmodel.webhooks.signing import secret_key

    try:
        secret_key(args.secret)
    except ValueError:
        print("error: --secret is not a webhook secret (whsec_…)", file=sys.stderr)
        return 2
    return listen(args.secret, host=args.host, port=args.port, count=args.count)


def _cmd_up(args: argparse.Namespace) -> int:
    from hiddenmodel import up

    return up.run(host=args.host, port=args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hiddenmodel", description=__doc__)
    parser.add_argument("--log-level", default="info")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="the whole platform on embedded defaults, with demo data")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.set_defaults(func=_cmd_up)

    hook = sub.add_parser(
        "webhook-listen",
        help="receive webhooks on this machine: verify each signature and print the event",
    )
    hook.add_argument("--secret", required=True, help="the endpoint's signing secret, whsec_…")
    hook.add_argument("--host", default="127.0.0.1")
    hook.add_argument("--port", type=int, default=8787)
    hook.add_argument("--count", type=int, default=None, help="exit after this many events")
    hook.set_defaults(func=_cmd_webhook_listen)

    api = sub.add_parser("api", help="serve the HTTP API and the portal")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--workers", type=int, default=1)
    api.set_defaults(func=_cmd_api)

    worker = sub.add_parser("worker", help="run a Celery worker (one process per GPU)")
    worker.add_argument("--queues", default="gpu,cpu,webhooks,maintenance")
    worker.add_argument(
        "--pool",
        default="solo",
        choices=["solo", "prefork", "threads"],
        help="GPU workers: threads, with --concurrency at least the batch size, so jobs can "
        "be batched onto the one resident model",
    )
    worker.add_argument("--concurrency", type=int, default=1)
    worker.add_argument("--hostname", default=None)
    worker.add_argument(
        "--prefetch-multiplier",
        type=int,
        default=None,
        choices=range(1, 17),
        metavar="N",
        help="messages the worker holds per pool process, the one it runs included (default "
        "1, from the Celery app): 2 suits many short jobs, 1 long ones (the model operations)",
    )
    worker.set_defaults(func=_cmd_worker)

    tiny = sub.add_parser(
        "make-tiny-model", help="write a tiny random SDXL inpainting model (tests, demos)"
    )
    tiny.add_argument("dir", type=Path)
    tiny.add_argument(
        "--segmenters",
        action="store_true",
        help="also write a tiny random clothes parser and SAM under DIR/segmentation; their "
        "masks are noise, so ghost_mannequin jobs on them mostly find no garment",
    )
    tiny.set_defaults(func=_cmd_make_tiny_model)

    sub.add_parser(
        "dispatcher", help="release queued jobs fairly and reconcile lost or stuck ones"
    ).set_defaults(func=_cmd_dispatcher)

    sub.add_parser(
        "migrate", help="bootstrap roles and database, then upgrade the schema"
    ).set_defaults(func=_cmd_migrate)
    sub.add_parser("openapi", help="print the OpenAPI document").set_defaults(func=_cmd_openapi)
    functions = sub.add_parser(
        "sql-functions",
        help="compare the database's SQL functions with migrations/sql (exit 1 on a difference)",
    )
    functions.add_argument(
        "--write", action="store_true", help="write each changed definition as its next version"
    )
    functions.set_defaults(func=_cmd_sql_functions)

    user = sub.add_parser("create-user", help="create a user (operators: --superuser)")
    user.add_argument("--email", required=True)
    user.add_argument("--password", required=True)
    user.add_argument("--superuser", action="store_true")
    user.set_defaults(func=_cmd_create_user)

    org = sub.add_parser("create-org", help="create an organization owned by an existing user")
    org.add_argument("--slug", required=True)
    org.add_argument("--name", required=True)
    org.add_argument("--owner-email", required=True)
    org.set_defaults(func=_cmd_create_org)

    key = sub.add_parser("create-api-key", help="create an API key and print it (shown once)")
    key.add_argument("--org", required=True, help="organization slug or id")
    key.add_argument("--name", required=True)
    key.add_argument("--scopes", nargs="+", default=["jobs:write", "jobs:read", "usage:read"])
    key.set_defaults(func=_cmd_create_api_key)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, get_settings().log_format)
    try:
        return int(args.func(args))
    except Exception as exc:
        from hiddenmodel.errors import Problem

        if isinstance(exc, Problem):
            print(f"error: {exc.detail or exc.title}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
