"""Run moto's S3 API server on 127.0.0.1 for tests: ``python tests/moto_server.py [--port N]``.

Prints ``MOTO_READY <port>`` once it listens (port 0 picks a free one) and serves until SIGTERM.

Why not plain ``moto_server``: moto checks ``If-None-Match``/``If-Match`` and then stores the object
as two separate steps in a threaded server, so two racing conditional PUTs can both pass the check.
AWS S3 documents conditional writes as atomic (the loser gets 412, or 409 while the winner is still
in flight). To make the emulator keep that promise we serialize object PUTs inside it with one lock.
This changes nothing in freshnet: the client code is exercised exactly as against S3.
"""

from __future__ import annotations

import argparse
import functools
import signal
import sys
import threading


def _make_conditional_puts_atomic() -> None:
    from moto.s3.responses import S3Response

    lock = threading.Lock()
    original = S3Response.put_object

    @functools.wraps(original)
    def put_object(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        with lock:
            return original(self, *args, **kwargs)

    S3Response.put_object = put_object  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    _make_conditional_puts_atomic()
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server(
        args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler
    )

    def stop(signum: int, frame: object) -> None:
        # shutdown() waits for serve_forever to return, so it must run off the serving thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"MOTO_READY {server.server_address[1]}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
