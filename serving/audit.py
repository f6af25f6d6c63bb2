"""The promotion audit trail: ``audit.jsonl``, one hash-chained JSON record per line.

Each record carries ``prev`` (the previous record's hash; 64 zeros for the first) and ``hash``
(SHA-256 of the record's canonical JSON without ``hash``). :func:`verify` recomputes both, so an
edited record (its hash no longer matches), a deleted or reordered one (the next record's
``prev`` no longer matches) and a truncated tail (``audit.head`` names a later hash) are all
reported with their line numbers. A chain only detects tampering by someone who does not
recompute it: keep a copy of the trail where the promoter cannot write (CI uploads it as an
artifact) to detect a rewrite of the whole file.

Every attempt writes a ``started`` record before it changes anything and an outcome record
after (refused, done, error, crashed, lock busy), both fsynced; a promotion killed in between
leaves a ``started`` record with no outcome, which :func:`verify` lists as unfinished.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

AUDIT_FILE = "audit.jsonl"
HEAD_FILE = "audit.head"
APPEND_LOCK = ".audit.lock"
GENESIS = "0" * 64


def _digest(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _last_hash(path: Path) -> str:
    if not path.exists() or path.stat().st_size == 0:
        return GENESIS
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - 65536))
        lines = f.read().splitlines()
    last = next((line for line in reversed(lines) if line.strip()), b"")
    try:
        return str(json.loads(last)["hash"])
    except (ValueError, KeyError):
        return hashlib.sha256(last).hexdigest()  # an unchained legacy line: chain onto its bytes


def append(prod: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Chain ``record`` onto the trail and fsync it; returns the record as written."""
    from filelock import FileLock

    prod.mkdir(parents=True, exist_ok=True)
    path = prod / AUDIT_FILE
    # Short-lived and separate from the promotion lock: a refused attempt is recorded too.
    with FileLock(str(prod / APPEND_LOCK), timeout=60):
        chained = dict(record, prev=_last_hash(path))
        chained["hash"] = _digest(chained)
        line = json.dumps(chained, sort_keys=True, default=str) + "\n"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        head = prod / HEAD_FILE
        tmp = head.with_name(f".{HEAD_FILE}.tmp")
        tmp.write_text(chained["hash"] + "\n")
        os.replace(tmp, head)
    return chained


def read(prod: Path) -> list[dict[str, Any]]:
    path = prod / AUDIT_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def verify(prod: Path) -> tuple[list[str], list[str]]:
    """(problems, unfinished): chain breaks by line number; attempts with no outcome."""
    path = prod / AUDIT_FILE
    problems: list[str] = []
    started: dict[str, int] = {}
    prev = GENESIS
    if not path.exists():
        return [f"{path}: missing"], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            problems.append(f"line {n}: not JSON")
            prev = hashlib.sha256(line.encode()).hexdigest()
            continue
        if record.get("hash") != _digest(record):
            problems.append(f"line {n}: edited (its hash does not match its contents)")
        if record.get("prev") != prev:
            problems.append(f"line {n}: chain broken (a record before it was deleted or moved)")
        prev = str(record.get("hash"))
        attempt = record.get("attempt")
        if attempt and record.get("event") == "started":
            started[attempt] = n
        elif attempt:
            started.pop(attempt, None)
    head = prod / HEAD_FILE
    if head.exists() and head.read_text().strip() != prev:
        problems.append(f"{head}: names a later record than the last line (records removed)")
    unfinished = [f"line {n}: attempt {a} started, no outcome" for a, n in started.items()]
    return problems, unfinished
