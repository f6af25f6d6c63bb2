"""`make bench`: run every benchmark; each rewrites its own section of bench/RESULTS.md."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = [
    "ingest.py",
    "train_throughput.py",
    "train_workers.py",
    "train_export.py",
    "server_latency.py",
    "client.py",
    "right_answers.py",
]

if __name__ == "__main__":
    only = sys.argv[1:]
    failed = []
    for script in SCRIPTS:
        if only and not any(o in script for o in only):
            continue
        print(f"== {script}", flush=True)
        if subprocess.run([sys.executable, str(HERE / script)]).returncode:
            failed.append(script)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")
