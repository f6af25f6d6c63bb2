"""What a user sees on the terminal: no TensorFlow start-up noise, progress lines, -q, -v."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.console import NOISE, Progress, duration, number
from tests.conftest import tabular_rows, write_csv

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )


@pytest.mark.integration
def test_a_stage_prints_progress_and_no_tensorflow_startup_noise(tmp_path):
    write_csv(tmp_path / "d.csv", ["x1", "x2", "color", "label"], tabular_rows(200))
    common = ["--set", "data.source='d.csv'", "--set", "artifacts='art'"]
    r = _run("ingest", *common, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    noise = [line for line in r.stderr.splitlines() if NOISE.search(line.encode())]
    assert noise == []
    assert "ingest: 200/200 rows" in r.stderr and "ingest: done in" in r.stderr
    quiet = _run("ingest", "-q", *common, cwd=tmp_path)
    # -q: no progress or step lines (they start with the stage's name); warnings stay.
    assert quiet.returncode == 0
    assert not [line for line in quiet.stderr.splitlines() if line.startswith("ingest")]
    # -v brings TensorFlow's own lines back, where this TensorFlow build prints any.
    bare = subprocess.run(
        [sys.executable, "-c", "import tensorflow as tf; tf.config.list_physical_devices()"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if any(NOISE.search(line.encode()) for line in bare.stderr.splitlines()):
        # A CSV ingest never imports TensorFlow; reading TFRecord files does.
        import tensorflow as tf

        with tf.io.TFRecordWriter(str(tmp_path / "d.tfrecord")) as w:
            for i in range(40):
                feature = {
                    "x": tf.train.Feature(float_list=tf.train.FloatList(value=[float(i)])),
                    "label": tf.train.Feature(
                        bytes_list=tf.train.BytesList(value=[b"ab"[i % 2 :][:1]])
                    ),
                }
                w.write(
                    tf.train.Example(
                        features=tf.train.Features(feature=feature)
                    ).SerializeToString()
                )
        tfr = ["--set", "data.source='d.tfrecord'", "--set", "artifacts='art2'"]
        for flags, noisy in (((), False), (("-v",), True)):
            r = _run("ingest", *flags, *tfr, cwd=tmp_path)
            assert r.returncode == 0, r.stderr
            assert any(NOISE.search(line.encode()) for line in r.stderr.splitlines()) == noisy


def test_plain_progress_lines_when_not_a_terminal(capsys, monkeypatch):
    import pipeline.console as console

    monkeypatch.setattr(console, "PLAIN_EVERY", 0.0)
    with Progress("ingest", 4, "rows") as progress:
        for _ in range(4):
            progress.update(1)
        progress.postfix = "1 bad"
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("ingest: 1/4 rows (") and "ETA" in lines[0]
    assert lines[-1].startswith("ingest: 4/4 rows") and lines[-1].endswith("1 bad)")


def test_numbers_and_durations_for_people():
    assert number(0.30000000000000004) == "0.3"
    assert number(0.0017150743) == "0.001715"
    assert number(64) == "64"
    assert (duration(3.21), duration(125), duration(7300)) == ("3.2s", "2m05s", "2h01m")
