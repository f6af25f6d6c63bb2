"""``python -m serving.server``: tensorflow_model_server's flags, our embedded server."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys

from serving.server.options import OptionsError, options_from_args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        options = options_from_args(argv)
        from serving.server.server import ModelServer

        server = ModelServer(options)
    except OptionsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    server.start()
    # Containers stop us with SIGTERM: finish in-flight requests, then exit.
    signal.signal(signal.SIGTERM, lambda *_: server.request_stop())
    with contextlib.suppress(KeyboardInterrupt):
        server.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
