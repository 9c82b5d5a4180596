"""How the service words library messages: settings as the JSON fields of its request bodies (the
library's own names), and a step to run again as the endpoint that runs it (errors.step)."""

from __future__ import annotations

from ..errors import BitallocError, cli_step, phrase, python_name

HTTP_STEPS = {"profile": "POST /v1/profiles", "plan": "POST /v1/plans", "export": "GET /v1/plans/{plan_id}/export"}


def http_step(name: str) -> str:
    # apply and latency are not served over HTTP: the command line runs them
    return HTTP_STEPS.get(name) or cli_step(name)


HTTP_WORDING = (python_name, http_step)  # exports.export_plan's wording=


def http_text(message: str | BitallocError) -> str:
    """An error's message or an export note, worded for an HTTP client."""
    if isinstance(message, BitallocError):
        return message.phrased(python_name, http_step)
    return phrase(message, python_name, http_step)
