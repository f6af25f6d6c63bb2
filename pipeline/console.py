"""What the user sees: TensorFlow's start-up noise kept out, progress for the long steps.

TensorFlow 2.21 writes its C++ start-up lines (``WARNING: All log messages before
absl::InitializeLog() is called are written to STDERR``, ``Could not find cuda drivers``,
``failed call to cuInit``, oneDNN notices) straight to file descriptor 2 before absl's logging
is initialised, so ``TF_CPP_MIN_LOG_LEVEL`` does not reach them. :func:`quiet_tensorflow`
imports TensorFlow (and lets it probe its devices) with fd 2 pointed at a temporary file, then
replays every line that is not one of those known notices: real errors still show.

Progress: a tqdm bar on a terminal; on anything else (CI logs, files) a plain line at most every
``PLAIN_EVERY`` seconds; nothing under ``-q``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from typing import Any

# Known start-up notices of TensorFlow's C++ runtime (one per line of its stderr).
NOISE = re.compile(
    rb"All log messages before absl::InitializeLog|cudart_stub\.cc|cuda_platform\.cc|cuInit"
    rb"|cuda_executor\.cc|oneDNN custom operations|Unable to register cu(DNN|FFT|BLAS) factory"
    rb"|computation placer already registered|TF-TRT Warning|This TensorFlow binary is optimized"
    rb"|rebuild TensorFlow with the appropriate compiler flags|port\.cc:\d+\] oneDNN"
    rb"|cpu_feature_guard\.cc|absl::InitializeLog"
)
# Keras messages that say nothing to the user of this pipeline.
KERAS_NOISE = (
    r".*Your input ran out of data.*",
    r".*Skipping variable loading for optimizer.*",
    r".*does not have a `build\(\)` method implemented.*",
    r".*`build\(\)` was called on layer.*",
)
PLAIN_EVERY = 10.0

_verbosity = 0  # -1 quiet, 0 normal, 1 verbose


def configure(quiet: bool = False, verbose: bool = False) -> None:
    """Logging and warning filters for a command (``-q`` / ``-v``)."""
    global _verbosity
    _verbosity = -1 if quiet else (1 if verbose else 0)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbose else "2")
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        for noisy in ("absl", "tensorflow", "h5py"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        for message in KERAS_NOISE:
            warnings.filterwarnings("ignore", message=message)


@contextlib.contextmanager
def _native_stderr_filtered() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture if line.strip() and not NOISE.search(line)]
            if kept:
                sys.stderr.buffer.write(b"".join(kept))
                sys.stderr.flush()


def quiet_tensorflow() -> Any:
    """Import TensorFlow without its start-up notices (unless ``-v``); returns the module."""
    if _verbosity > 0 or "tensorflow" in sys.modules:
        import tensorflow as tf

        return tf
    with _native_stderr_filtered():
        import tensorflow as tf

        tf.config.list_physical_devices()  # the CUDA probe prints here
    return tf


def interactive() -> bool:
    return sys.stderr.isatty() and _verbosity >= 0


def say(text: str) -> None:
    """A progress line (stderr), unless ``-q``."""
    if _verbosity >= 0:
        print(text, file=sys.stderr, flush=True)


class Progress:
    """Counts toward ``total`` (None: unknown) with a rate and an ETA.

    ``postfix`` (e.g. bad records so far) is shown beside the count.
    """

    def __init__(self, desc: str, total: int | None = None, unit: str = "it"):
        self.desc, self.total, self.unit = desc, total, unit
        self.count = 0
        self.postfix = ""
        self.start = time.monotonic()
        self._last = self.start
        self._bar: Any = None
        if interactive():
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, desc=desc, unit=unit, file=sys.stderr, mininterval=0.5, leave=False
            )

    def update(self, n: int = 1, postfix: str = "") -> None:
        self.count += n
        if postfix:
            self.postfix = postfix
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix_str(postfix, refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= PLAIN_EVERY:
            self._last = now
            say(self.line())

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        rate = self.count / elapsed if elapsed > 0 else 0.0
        done = f"{self.count:,}" + (f"/{self.total:,}" if self.total else "")
        eta = ""
        if self.total and rate > 0 and self.count < self.total:
            eta = f", ETA {duration((self.total - self.count) / rate)}"
        extra = f", {self.postfix}" if self.postfix else ""
        return (
            f"{self.desc}: {done} {self.unit} ({rate:,.0f} {self.unit}/s, "
            f"{duration(elapsed)}{eta}{extra})"
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        say(self.line())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@contextlib.contextmanager
def step(name: str) -> Iterator[None]:
    """``name ...`` then ``name: done in 3.2s`` (or ``failed after``)."""
    start = time.monotonic()
    say(f"{name} ...")
    try:
        yield
    except BaseException:
        say(f"{name}: failed after {duration(time.monotonic() - start)}")
        raise
    say(f"{name}: done in {duration(time.monotonic() - start)}")


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


def number(value: Any) -> str:
    """A hyperparameter or metric for people: 0.30000000000000004 → 0.3."""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def epoch_callback(total_epochs: int, desc: str = "train") -> Any:
    """A Keras callback printing one line per epoch: metrics, elapsed and ETA."""
    import keras

    class EpochLine(keras.callbacks.Callback):
        def on_train_begin(self, logs: Any = None) -> None:
            self.start = time.monotonic()

        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            elapsed = time.monotonic() - self.start
            done = epoch + 1
            eta = elapsed / done * (total_epochs - done)
            shown = ", ".join(f"{k} {number(float(v))}" for k, v in (logs or {}).items())
            say(
                f"{desc}: epoch {done}/{total_epochs} {shown} "
                f"({duration(elapsed)}, ETA ≤ {duration(eta)})"
            )

    return EpochLine()
