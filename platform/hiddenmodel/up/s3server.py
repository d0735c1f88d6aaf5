"""The embedded S3 endpoint of ``up``: moto's S3 application, served on its own.

``python -m moto.server`` puts every service moto emulates behind one dispatcher that works
out, request by request, which service a request is for (it lists moto's package folder twice
per request to do so). ``up`` only ever speaks S3 to it, so this serves moto's S3 application
directly: the same requests get the same answers for about half the server CPU per GET and a
sixth less per PUT (docs/BENCHMARKS.md, "The single-process peer's job"). Request lines are
not logged: at a few requests per job they cost more than they tell.

    python -m hiddenmodel.up.s3server --host 127.0.0.1 --port 9000
"""

from __future__ import annotations

import argparse
import logging


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)

    # Imported here: moto is an optional ("embedded") dependency.
    from moto.moto_server.werkzeug_app import MotoRequestHandler, create_backend_app
    from werkzeug.serving import run_simple

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    # moto's own handler: it keeps request headers whose names hold underscores
    # (``x-amz-meta-a_b``), which werkzeug's drops.
    run_simple(
        args.host,
        args.port,
        create_backend_app("s3"),
        threaded=True,
        request_handler=MotoRequestHandler,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
