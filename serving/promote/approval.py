"""Who approved: the CLI's --approver/--reason, or the GitHub environment's reviewer read from
the run's approvals API (never from the approver's own environment)."""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Any

log = logging.getLogger(__name__)


def approval_record(args: argparse.Namespace) -> tuple[dict[str, Any] | None, str]:
    """(record, problem): who approved, from the GitHub environment's reviewers or the CLI.

    Under ``--approval-from-github ENV`` the record is a review that approved this workflow run's
    deployment to ENV, read from the GitHub API (``/actions/runs/RUN/approvals``): the person who
    clicked Approve, never whoever started the run. With no such review (the environment has no
    required reviewers) there is no record and the approval gate fails.
    """
    if args.approval_from_github:
        return github_approval(args.approval_from_github)
    if args.approve and args.approver and args.reason:
        return {"approver": args.approver, "reason": args.reason, "via": "cli"}, ""
    return None, "--approve with --approver NAME and --reason TEXT, or --approval-from-github ENV"


def github_approval(environment: str) -> tuple[dict[str, Any] | None, str]:
    import urllib.error
    import urllib.request

    env = os.environ
    missing = [k for k in ("GITHUB_REPOSITORY", "GITHUB_RUN_ID", "GITHUB_TOKEN") if not env.get(k)]
    if missing:
        return None, f"--approval-from-github needs {', '.join(missing)} (a GitHub Actions job)"
    api = env.get("GITHUB_API_URL", "https://api.github.com").rstrip("/")
    run = f"{env['GITHUB_REPOSITORY']}/actions/runs/{env['GITHUB_RUN_ID']}"
    request = urllib.request.Request(
        f"{api}/repos/{run}/approvals",
        headers={
            "Authorization": f"Bearer {env['GITHUB_TOKEN']}",
            "Accept": "application/vnd.github+json",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            reviews = json.load(r)
    except (urllib.error.URLError, OSError, ValueError) as e:
        return None, f"reading this run's environment approvals from {api}: {e}"
    approved = [
        r
        for r in reviews
        if r.get("state") == "approved"
        and any(e.get("name") == environment for e in r.get("environments", []))
    ]
    if not approved:
        return None, (
            f"an approval of this run by a required reviewer of the '{environment}' environment "
            "(Settings → Environments → required reviewers; see docs/production.md)"
        )
    review = approved[-1]
    url = f"{env.get('GITHUB_SERVER_URL', 'https://github.com')}/{run}"
    return {
        "approver": review["user"]["login"],
        "reason": review.get("comment") or f"approved the '{environment}' deployment of {url}",
        "via": f"github-environment:{environment}",
        "run_url": url,
    }, ""


def _operator() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid {os.getuid()}"


def _approved_by(approval: dict[str, Any] | None) -> str:
    if not approval:
        return ""
    if approval.get("emergency"):
        return f" EMERGENCY by {approval.get('operator')} ({approval.get('reason')})"
    return f" by {approval.get('approver')}"
