"""One self-contained HTML page per run: ``python -m pipeline report [--run-id R]``.

Everything a person wants to look at after a run, from the run's own files: the data
(statistics, histograms, anomalies), the tuning trials, the learning curves with the fit
diagnosis, the test metrics (confusion matrix, per-class precision/recall, PR and ROC curves
with the chosen threshold, residuals), the examples the model gets most wrong, and, once the run
is exported, the version's lineage and its promotion history from the production audit log.
Charts are drawn with matplotlib and embedded as PNG data URIs: the page is one file that opens
anywhere, offline. Export copies it into the version (``assets.extra/report.html``).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import artifacts as A
from pipeline.console import number

SECTIONS = ("Summary", "Data", "Tuning", "Training", "Evaluation", "Errors", "Version")

CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1f2933;
background:#f5f7fa}
header{background:#243b53;color:#fff;padding:22px 40px}
header h1{margin:0 0 4px;font-size:26px}header p{margin:0;color:#bcccdc}
nav{background:#334e68;padding:8px 40px}nav a{color:#d9e2ec;margin-right:18px;
text-decoration:none;font-size:14px}
main{max-width:1180px;margin:0 auto;padding:10px 40px 60px}
section{background:#fff;border-radius:8px;box-shadow:0 1px 3px rgba(0,0,0,.12);
margin:22px 0;padding:18px 26px}
h2{margin:0 0 12px;font-size:20px;color:#243b53;border-bottom:2px solid #d9e2ec;
padding-bottom:6px}
h3{font-size:16px;margin:18px 0 8px;color:#334e68}
table{border-collapse:collapse;margin:8px 0 14px;font-size:14px}
th,td{border-bottom:1px solid #e4e7eb;padding:5px 12px;text-align:left;vertical-align:top}
th{background:#f0f4f8;color:#334e68}td.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:14px;margin:6px 0 10px}
.card{background:#f0f4f8;border-radius:6px;padding:10px 16px;min-width:120px}
.card b{display:block;font-size:22px;color:#102a43}.card span{font-size:13px;color:#627d98}
.verdict{display:inline-block;padding:3px 10px;border-radius:12px;font-weight:600}
.good{background:#e3f9e5;color:#207227}.warn{background:#fffbea;color:#8d2b0b}
.bad{background:#ffe3e3;color:#ab091e}
img{max-width:100%;height:auto}.charts{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.muted{color:#829ab1}code{background:#f0f4f8;padding:1px 5px;border-radius:3px}
"""


def write_report(run_dir: Path, audit: Path | None = None, out: Path | None = None) -> Path:
    """Render the run's page to ``out`` (default ``RUN/report.html``), atomically."""
    page = render(run_dir, audit)
    path = out or run_dir / A.RUN_REPORT
    A.atomic_write_text(path, page)
    return path


def _read(run_dir: Path, name: str) -> Any:
    path = run_dir / name
    return A.read_json(path) if path.exists() else None


def render(
    run_dir: Path,
    audit: Path | None = None,
    exported: dict[str, Any] | None = None,
    card: dict[str, Any] | None = None,
) -> str:
    """The page as a string; ``exported``/``card`` describe a version still being built
    (export renders the page before the version is published)."""
    import matplotlib

    matplotlib.use("Agg")
    if not (run_dir / A.STATS).exists():
        raise A.PipelineError(f"{run_dir}: not a run directory (no {A.STATS}); run ingest first")
    stats = A.read_json(run_dir / A.STATS)
    schema = _read(run_dir, A.SCHEMA) or {}
    metrics = _read(run_dir, A.METRICS)
    if exported is None:
        exported = _read(run_dir, A.EXPORTED)
        if exported and Path(exported["path"], A.MODEL_CARD).exists():
            card = A.read_json(Path(exported["path"], A.MODEL_CARD))
    name = (card or {}).get("name") or schema.get("label", {}).get("name") or run_dir.parent.name
    body = [
        _summary(run_dir, metrics, card),
        _data(stats, _read(run_dir, A.ANOMALIES)),
        _tuning(_read(run_dir, A.TUNER_SUMMARY)),
        _training(_read(run_dir, A.HISTORY), metrics),
        _evaluation(run_dir, metrics),
        _errors(run_dir, _read(run_dir, A.ERRORS)),
        _version(exported, card, audit),
    ]
    nav = "".join(f'<a href="#{s.lower()}">{s}</a>' for s in SECTIONS)
    created = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{_e(name)} · run {_e(run_dir.name)}</title>"
        '<meta name=viewport content="width=device-width,initial-scale=1">'
        f"<style>{CSS}</style></head><body>"
        f"<header><h1>{_e(name)}</h1><p>run <code>{_e(run_dir.name)}</code> · "
        f"report written {created}</p></header><nav>{nav}</nav><main>"
        + "".join(body)
        + "</main></body></html>\n"
    )


# --- sections ------------------------------------------------------------------------------


def _section(title: str, content: str) -> str:
    return f'<section id="{title.lower()}"><h2>{title}</h2>{content}</section>'


def _summary(run_dir: Path, metrics: dict[str, Any] | None, card: Any) -> str:
    if metrics is None:
        return _section("Summary", "<p class=muted>Not evaluated yet (run evaluate).</p>")
    cards = [("task", metrics["task"]), ("test examples", metrics["examples"])]
    for key in ("accuracy", "auc", "macro_f1", "f1", "r2", "rmse", "mae"):
        if metrics.get(key) is not None:
            cards.append((key, number(float(metrics[key]))))
    if card:
        cards.append(("exported version", card["version"]))
    d = metrics.get("diagnosis", {})
    verdict = d.get("verdict", "")
    tone = "good" if verdict == "good fit" else ("bad" if "fit" in verdict else "warn")
    return _section(
        "Summary",
        _cards(cards) + f'<p>Fit diagnosis: <span class="verdict {tone}">{_e(verdict)}</span> '
        f"{_e(d.get('reason', ''))}.</p>",
    )


def _data(stats: dict[str, Any], anomalies: dict[str, Any] | None) -> str:
    splits = [(s, stats[s]["examples"]) for s in ("train", "val", "test", "all") if s in stats]
    parts = [_cards(splits)]
    everything = stats["all"]
    rows = []
    charts = []
    for feature, entry in everything["features"].items():
        rows.append(_feature_row(feature, entry))
        hist = entry.get("histogram") or (entry.get("brightness") or {}).get("histogram")
        if "top" in entry:
            charts.append(_bars(feature, dict(entry["top"][:20])))
        elif hist and sum(hist["counts"]):
            title = feature if "histogram" in entry else f"{feature} (pixel brightness)"
            charts.append(_histogram(title, hist))
    parts.append(_table(["feature", "kind", "missing", "summary"], rows, raw=True) if rows else "")
    label = everything.get("label", {})
    if "classes" in label:
        charts.insert(0, _bars("label distribution", label["classes"]))
    elif "histogram" in label:
        charts.insert(0, _histogram("label", label["histogram"]))
    parts.append(f'<div class="charts">{"".join(charts[:12])}</div>')
    parts.append("<h3>Anomalies</h3>")
    found = (anomalies or {}).get("anomalies", [])
    if found:
        parts.append(
            _table(
                ["kind", "where", "detail"],
                [
                    [a.get("kind", ""), a.get("feature", a.get("split", "")), a.get("message", "")]
                    for a in found
                ],
            )
        )
    else:
        parts.append("<p>None: the data matches its schema.</p>")
    bad = (anomalies or {}).get("bad_records", [])
    counts = (anomalies or {}).get("counts", {})
    if bad:
        parts.append(f"<h3>Bad records ({counts.get('bad', len(bad))})</h3>")
        parts.append(_table(["where", "why"], [[b["origin"], b["reason"]] for b in bad[:20]]))
    return _section("Data", "".join(parts))


def _feature_row(feature: str, entry: dict[str, Any]) -> list[str]:
    if "shape" in entry:
        kind, summary = "image", "×".join(str(d) for d in entry["shape"])
        sizes = entry.get("sizes", {})
        if len(sizes) > 1:
            summary += f" (from {len(sizes)} sizes)"
    elif "top" in entry:
        kind = "categorical"
        top = ", ".join(f"{_e(str(k))} ({v})" for k, v in entry["top"][:6])
        summary = f"{entry.get('distinct', len(entry['top']))} distinct: {top}"
    elif "mean" in entry:
        kind = "numeric"
        summary = (
            f"mean {number(entry['mean'])}, std {number(entry.get('std', 0.0))}, "
            f"range [{number(entry.get('min'))}, {number(entry.get('max'))}]"
        )
    else:
        kind, summary = "other", _e(json.dumps(entry)[:120])
    return [_e(feature), kind, str(entry.get("missing", 0)), summary]


def _tuning(summary: dict[str, Any] | None) -> str:
    if not summary:
        return _section("Tuning", "<p class=muted>No search in this run (tuning skipped).</p>")
    objective = summary["objective"]
    trials = [t for t in summary["trials"] if t["score"] is not None]
    best = summary.get("best", {})
    shown = {k: v for k, v in best.items() if not k.startswith("tuner/")}
    parts = [
        _cards(
            [
                ("algorithm", summary.get("algorithm", "")),
                ("trials", len(summary["trials"])),
                ("scored", len(trials)),
                ("seconds", summary.get("seconds", "")),
            ]
        )
    ]
    charts = []
    if trials:
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator

        fig, ax = plt.subplots(figsize=(6.5, 3.2))
        ids = list(range(1, len(trials) + 1))
        scores = [t["score"] for t in trials]
        better = min if objective["direction"] == "min" else max
        running = [better(scores[:i]) for i in ids]
        ax.scatter(ids, scores, s=18, label=f"trial {objective['name']}")
        ax.step(ids, running, where="post", color="#d64545", label="best so far")
        ax.set_xlabel("trial (in order)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(objective["name"])
        ax.legend(fontsize=8)
        charts.append(_figure(fig, "score per trial"))
    parts.append(f'<div class="charts">{"".join(charts)}</div>')
    parts.append("<h3>Best hyperparameters</h3>")
    parts.append(_table(["name", "value"], [[k, number(v)] for k, v in shown.items()]))
    return _section("Tuning", "".join(parts))


def _training(history: dict[str, list[float]] | None, metrics: dict[str, Any] | None) -> str:
    if not history or not history.get("loss"):
        return _section("Training", "<p class=muted>No training history.</p>")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = [k for k in history if not k.startswith("val_") and f"val_{k}" in history]
    charts = []
    for key in keys:
        fig, ax = plt.subplots(figsize=(4.6, 3.0))
        epochs = range(1, len(history[key]) + 1)
        ax.plot(epochs, history[key], label="train")
        ax.plot(epochs, history[f"val_{key}"], label="validation")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(key)
        ax.legend(fontsize=8)
        charts.append(_figure(fig, f"learning curve: {key}"))
    d = (metrics or {}).get("diagnosis", {})
    rows = [[k, number(v)] for k, v in d.items() if k not in ("verdict", "reason")]
    text = (
        f"<p><b>{_e(d.get('verdict', ''))}</b>: {_e(d.get('reason', ''))}. Overfitting shows as "
        "a validation loss that turns up while the training loss keeps falling; underfitting as "
        "both staying high.</p>"
        if d
        else ""
    )
    return _section(
        "Training",
        f'<div class="charts">{"".join(charts)}</div>{text}'
        + (_table(["measure", "value"], rows) if rows else ""),
    )


def _evaluation(run_dir: Path, m: dict[str, Any] | None) -> str:
    if m is None:
        return _section("Evaluation", "<p class=muted>Not evaluated yet.</p>")
    import matplotlib.pyplot as plt

    rows = [[k, number(float(m[k]))] for k in A.METRIC_KEYS if m.get(k) is not None]
    parts = [_table(["metric (test split)", "value"], rows)]
    base = m.get("baselines") or {}
    if base:
        key = "r2" if m["task"] == "regression" else "accuracy"
        compared = [["this model", number(m.get(key)) if m.get(key) is not None else "-"]]
        for kind in ("trivial", "linear"):
            entry = base.get(kind, {})
            value = entry.get(key)
            compared.append(
                [f"{kind}: {entry.get('rule', '')}", number(value) if value is not None else "-"]
            )
        parts.append(f"<h3>Against the baselines (same train and test splits, {key})</h3>")
        parts.append(_table(["model", key], compared))
    if "threshold_chosen_by" in m:
        parts.append(f"<p>Decision threshold chosen by: {_e(m['threshold_chosen_by'])}.</p>")
    charts = []
    if "confusion_matrix" in m:
        cm = np.asarray(m["confusion_matrix"])
        n = len(cm)
        fig, ax = plt.subplots(figsize=(2.2 + 0.5 * n, 2.0 + 0.5 * n))
        ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(n), m["classes"], rotation=90)
        ax.set_yticks(range(n), m["classes"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        for i in range(n):
            for j in range(n):
                color = "white" if cm[i, j] > cm.max() / 2 else "black"
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7, color=color)
        charts.append(_figure(fig, "confusion matrix"))
    if m.get("pr_curve", {}).get("precision"):
        fig, ax = plt.subplots(figsize=(4.2, 3.6))
        ax.plot(m["pr_curve"]["recall"], m["pr_curve"]["precision"])
        ax.scatter([m["recall"]], [m["precision"]], color="#d64545", zorder=3)
        ax.annotate(
            f"threshold {m['threshold']:.3f}",
            (m["recall"], m["precision"]),
            xytext=(-70, -18),
            textcoords="offset points",
            fontsize=8,
        )
        ax.set_xlabel("recall")
        ax.set_ylabel("precision")
        ax.set_title("precision vs recall")
        charts.append(_figure(fig, "precision-recall curve"))
    if m.get("roc_curve", {}).get("fpr"):
        fig, ax = plt.subplots(figsize=(4.2, 3.6))
        ax.plot(m["roc_curve"]["fpr"], m["roc_curve"]["tpr"])
        ax.plot([0, 1], [0, 1], color="#9fb3c8", linestyle="--")
        ax.scatter([m["false_positive_rate"]], [m["recall"]], color="#d64545", zorder=3)
        ax.annotate(
            f"threshold {m['threshold']:.3f}",
            (m["false_positive_rate"], m["recall"]),
            xytext=(12, -18),
            textcoords="offset points",
            fontsize=8,
        )
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title(f"ROC (AUC {m.get('auc') or 0:.3f})")
        charts.append(_figure(fig, "ROC curve"))
    if (run_dir / "predictions.png").exists():
        data = base64.b64encode((run_dir / "predictions.png").read_bytes()).decode()
        charts.append(f'<img alt="predicted vs true" src="data:image/png;base64,{data}">')
    parts.append(f'<div class="charts">{"".join(charts)}</div>')
    if "per_class" in m:
        parts.append("<h3>Per class</h3>")
        parts.append(
            _table(
                ["class", "precision", "recall", "F1", "support"],
                [
                    [c, number(v["precision"]), number(v["recall"]), number(v["f1"]), v["support"]]
                    for c, v in m["per_class"].items()
                ],
            )
        )
    return _section("Evaluation", "".join(parts))


def _errors(run_dir: Path, errors: dict[str, Any] | None) -> str:
    if not errors:
        return _section("Errors", "<p class=muted>Not evaluated yet.</p>")
    parts = []
    examples = errors["examples"]
    if (run_dir / A.ERROR_GRID).exists():
        data = base64.b64encode((run_dir / A.ERROR_GRID).read_bytes()).decode()
        parts.append(
            "<p>The test images the model got wrong with the most confidence "
            "(true → predicted, confidence):</p>"
            f'<img alt="worst misclassified test images" src="data:image/png;base64,{data}">'
        )
    if errors["task"] == "regression" and examples:
        import matplotlib.pyplot as plt

        true = np.array([e["true"] for e in examples])
        err = np.array([e["error"] for e in examples])
        fig, ax = plt.subplots(figsize=(4.6, 3.2))
        ax.scatter(true, err, s=14)
        ax.axhline(0, color="#9fb3c8")
        ax.set_xlabel("true value")
        ax.set_ylabel("prediction − true")
        ax.set_title("residuals of the worst predictions")
        parts.append(_figure(fig, "residuals"))
    if examples and not (run_dir / A.ERROR_GRID).exists():
        features = sorted({k for e in examples for k in e["features"]})[:8]
        if errors["task"] == "regression":
            head = ["#", "true", "predicted", "error", *features]
            rows = [
                [e["index"], number(e["true"]), number(e["predicted"]), number(e["error"])]
                + [number(e["features"].get(f, "")) for f in features]
                for e in examples
            ]
        else:
            head = ["#", "true", "predicted", "confidence", *features]
            rows = [
                [e["index"], e["true"], e["predicted"], number(e["confidence"])]
                + [number(e["features"].get(f, "")) for f in features]
                for e in examples
            ]
        if rows:
            parts.append(_table(head, rows))
    if not examples:
        parts.append("<p>No test example is misclassified.</p>")
    return _section("Errors", "".join(parts))


def _version(exported: dict[str, Any] | None, card: Any, audit: Path | None) -> str:
    if not exported or not card:
        return _section("Version", "<p class=muted>Not exported yet (run export).</p>")
    data = card.get("data", {})
    rows = [
        ["model", card["name"]],
        ["version", card["version"]],
        ["path", exported["path"]],
        ["run", data.get("run_id", "")],
        ["data fingerprint (SHA-256 of the shards)", data.get("fingerprint", "")],
        ["git commit", card.get("git_commit") or "(not a git checkout)"],
        ["created", card.get("created_at", "")],
        ["libraries", ", ".join(f"{k} {v}" for k, v in card.get("libraries", {}).items())],
    ]
    lineage = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    parts = ["<h3>Lineage</h3>", f"<table>{lineage}</table>"]
    history = _promotions(audit, card["name"], card["version"]) if audit else []
    parts.append("<h3>Promotion history</h3>")
    if history:
        parts.append(
            _table(["time", "action", "label", "outcome", "approved by", "reason"], history)
        )
    else:
        where = f" in <code>{_e(str(audit))}</code>" if audit else ""
        parts.append(f"<p class=muted>No promotion of this version recorded{where}.</p>")
    return _section("Version", "".join(parts))


def _promotions(audit: Path, model: str, version: int) -> list[list[Any]]:
    """Outcome records of the audit log that concern this version (promote, finalize,
    rollback to or from it)."""
    if not audit.exists():
        return []
    rows = []
    for line in audit.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") != "outcome" or record.get("model") != model:
            continue
        involved = (
            record.get("version") == version
            or version in (record.get("result", {}) or {}).get("labels", {}).values()
        )
        if not involved:
            continue
        approval = record.get("approval") or {}
        rows.append(
            [
                record.get("finished") or record.get("time", ""),
                record.get("action", ""),
                record.get("label", ""),
                record.get("outcome", ""),
                approval.get("approver", (record.get("emergency") and "emergency") or ""),
                approval.get("reason", record.get("emergency", "")),
            ]
        )
    return rows


# --- helpers -------------------------------------------------------------------------------


def _e(text: Any) -> str:
    return html.escape(str(text))


def _cards(items: Sequence[tuple[str, Any]]) -> str:
    inner = "".join(f'<div class="card"><b>{_e(v)}</b><span>{_e(k)}</span></div>' for k, v in items)
    return f'<div class="cards">{inner}</div>'


def _table(head: list[str], rows: list[list[Any]], raw: bool = False) -> str:
    def cell(v: Any) -> str:
        text = str(v) if raw else _e(v)
        numeric = isinstance(v, int | float) or text.replace(".", "", 1).lstrip("-").isdigit()
        return f'<td class="num">{text}</td>' if numeric else f"<td>{text}</td>"

    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _figure(fig: Any, alt: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _histogram(title: str, hist: dict[str, list[float]]) -> str:
    import matplotlib.pyplot as plt

    edges = np.asarray(hist["edges"], dtype=float)
    fig, ax = plt.subplots(figsize=(3.4, 2.3))
    ax.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge", color="#486581")
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    return _figure(fig, f"histogram of {title}")


def _bars(title: str, counts: dict[str, int]) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(3.4, 0.35 * len(counts)), 2.3))
    names = list(counts)[:40]
    ax.bar(range(len(names)), [counts[n] for n in names], color="#486581")
    ax.set_xticks(range(len(names)), names, rotation=90 if len(names) > 8 else 0, fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.tick_params(labelsize=7)
    return _figure(fig, title)
