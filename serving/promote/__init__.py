"""Gated promotion to production, canary, rollback and an audit trail.

    python -m serving.promote MODEL VERSION --from models --to production [--approve
        --approver NAME --reason TEXT] [--dry-run] [--canary] [--server SPEC]…
        [--runtime embedded|docker] [--allow-signature-break]
    python -m serving.promote {rollback,finalize} MODEL --to production --approver N --reason R
    python -m serving.promote status MODEL --to production [--server …]
    python -m serving.promote verify-audit --to production

Gates run first and change nothing, all on one staged copy of the candidate: integrity
(manifest, optional signature), quality (thresholds, and no regression against production's
``stable`` with both evaluated now on the same data), compatibility (production's signatures
still accepted), infra validation (a fresh server loads the candidate, replays its warmup,
answers real examples over gRPC matching in-process predictions, within the latency budget) and
approval. Only then the push: rename the staged copy to ``production/MODEL/VERSION``, write
``models.config`` with both versions, wait until *every* serving replica has the candidate
AVAILABLE, then move the label (TF Serving refuses a label on a version that is not AVAILABLE)
and wait until every replica resolves it, apply retention. Every file is replaced atomically; a
lock file keeps two promotions from interleaving; every attempt is recorded, before and after,
in the hash-chained ``production/audit.jsonl`` (serving/audit.py).

The package, one module per job, the CLI last: ``store`` (files, lock, audit records),
``evaluation`` (eval data, scoring), ``gates`` (the gates and the infra gate's fresh server),
``approval`` (who approved), ``publish`` (every replica, labels, retention), ``cli``.
"""

from serving.promote.approval import approval_record
from serving.promote.cli import main
from serving.promote.gates import free_port, gate_compatibility
from serving.promote.store import manifest_digest, read_server_config

__all__ = [
    "approval_record",
    "free_port",
    "gate_compatibility",
    "main",
    "manifest_digest",
    "read_server_config",
]
