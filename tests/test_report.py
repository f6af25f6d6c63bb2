"""The run's HTML page: built from a real run, opened in a real headless browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline import artifacts as A
from pipeline.report import SECTIONS, write_report
from tests.conftest import config, make_images, tabular_rows, write_csv

pytestmark = pytest.mark.integration
BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")


def _run(tmp: Path, source: Path, name: str, *extra: str) -> Path:
    from pipeline.evaluate import evaluate
    from pipeline.export import export
    from pipeline.ingest import ingest
    from pipeline.train import train
    from pipeline.tune import tune

    cfg = config(tmp, f'data.source="{source}"', f"model.name={name}", *extra)
    result = ingest(cfg)
    tune(cfg)
    train(cfg)
    evaluate(cfg)
    export(cfg)
    return result.run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    images = make_images(tmp / "images", per_class=30, classes=("a", "b", "c"))
    csv = write_csv(tmp / "binary.csv", ["x1", "x2", "color", "label"], tabular_rows(240))
    return {
        "images": _run(tmp / "img", images, "shapes"),
        "binary": _run(
            tmp / "tab", csv, "churn", 'model.task="binary"', "evaluate.target_recall=0.9"
        ),
    }


def test_the_page_has_every_section_and_the_version_carries_it(runs, tmp_path):
    binary = runs["binary"]
    exported = A.read_json(binary / A.EXPORTED)
    version = Path(exported["path"])
    audit = tmp_path / "audit.jsonl"
    audit.write_text(
        json.dumps(
            {
                "event": "outcome",
                "action": "promote",
                "model": "churn",
                "version": exported["version"],
                "label": "stable",
                "outcome": "promoted",
                "finished": "2026-11-28T10:00:00+00:00",
                "approval": {"approver": "alice", "reason": "weekly retrain"},
            }
        )
        + "\n"
    )
    page = write_report(binary, audit).read_text()
    for section in SECTIONS:
        assert f'<section id="{section.lower()}">' in page
    for chart in ("precision-recall curve", "ROC curve", "confusion matrix", "score per trial"):
        assert f'alt="{chart}"' in page
    assert "learning curve: loss" in page and "histogram of x1" in page
    assert "recall &gt;= 0.9" in page  # the threshold rule
    assert "alice" in page and "weekly retrain" in page  # promotion history
    assert A.read_json(binary / A.METRICS)["diagnosis"]["verdict"] in page
    # The page is self-contained: no link or script leaves the file.
    assert not re.search(r'(src|href)="(?!data:|#)', page) and "<script" not in page
    # Export put the page inside the version and the model card points at it.
    card = A.read_json(version / A.MODEL_CARD)
    assert card["report"] == A.VERSION_REPORT and (version / A.VERSION_REPORT).exists()
    from pipeline.export import verify_manifest

    assert verify_manifest(version) == []
    image_page = write_report(runs["images"]).read_text()
    assert 'alt="worst misclassified test images"' in image_page or (
        "No test example is misclassified" in image_page
    )


def test_report_command_and_a_run_not_evaluated(runs, tmp_path, capsys):
    from pipeline.__main__ import main

    run = runs["images"]
    out = tmp_path / "page.html"
    artifacts = str(run.parent.parent)  # artifacts/NAME/RUN_ID
    assert (
        main(
            [
                "report",
                "--set",
                f'artifacts="{artifacts}"',
                "--set",
                f"model.name={run.parent.name}",
                "--run-id",
                run.name,
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert f"report: {out}" in capsys.readouterr().out and out.stat().st_size > 10_000
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / A.STATS).write_text((run / A.STATS).read_text())
    page = write_report(bare).read_text()
    assert "Not evaluated yet" in page and "Not exported yet" in page


@pytest.mark.skipif(
    BROWSER is None and not os.environ.get("CI"),
    reason="no chromium here; .ci/run installs Debian's chromium",
)
def test_the_page_renders_in_a_real_browser(runs, tmp_path):
    """Headless Chromium: the DOM has every section and the screenshot is a real page."""
    from PIL import Image

    assert BROWSER, "CI must have chromium (.ci/run installs it)"
    page = runs["binary"] / A.RUN_REPORT
    flags = [
        BROWSER,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--hide-scrollbars",
    ]
    dom = subprocess.run(
        [*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    for section in SECTIONS:
        assert f'id="{section.lower()}"' in dom.stdout
    shot = tmp_path / "page.png"
    subprocess.run(
        [*flags, "--window-size=1300,3000", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (3000, 1300)
    # Not blank: the dark header, white cards and charts give a wide spread of grey levels.
    assert pixels.std() > 20 and (pixels < 80).mean() > 0.01 and (pixels > 240).mean() > 0.3
