"""``python -m serving.server``: tensorflow_model_server's flags, our embedded server."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys

from serving.server.options import OptionsError, options_from_args, parse_args

# tensorflow_model_server exits with main()'s -1 when it cannot start.
EXIT_START_FAILED = 255


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if parse_args(argv).version:
        from importlib.metadata import version

        import tensorflow as tf

        print(f"TensorFlow ModelServer: {version('tfserving-pipeline')} (embedded server)")
        print(f"TensorFlow Library: {tf.__version__}")
        return 0
    try:
        options = options_from_args(argv)
        from serving.server.errors import ServingError
        from serving.server.server import ModelServer

        server = ModelServer(options)
        # Containers stop us with SIGTERM: stop accepting, let in-flight requests finish for up
        # to --drain_grace_seconds, then exit. Installed before the ports open, so a SIGTERM
        # that follows the first request is never the default (immediate) death.
        signal.signal(signal.SIGTERM, lambda *_: server.request_stop())
        try:
            server.start()
        except ServingError as e:
            server.stop(grace=0)
            raise OptionsError(f"{e.code.name}: {e.message}") from e
    except OptionsError as e:
        print(f"Failed to start server. Error: {e}", file=sys.stderr)
        return EXIT_START_FAILED
    with contextlib.suppress(KeyboardInterrupt):
        server.wait()
    logging.getLogger("serving.server").info(
        "stopping: draining for up to %gs", options.drain_grace_seconds
    )
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
