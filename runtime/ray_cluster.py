"""Joining Ray, shared by `sd-run serve --ray` and `sd-run batch --ray` (needs the `[ray]` extra)."""

from __future__ import annotations

import os

import ray

AUTH_HINT = (
    "; a cluster started by `ray start` uses token authentication: give its address as 'auto' on one of its "
    "machines, or set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (see docs/scale-out.md)"
)


def connect(address: str | None) -> None:
    """Join the cluster at `address` ("auto": the one this machine is part of), or start a local Ray that
    listens on 127.0.0.1 only. Raises ConnectionError with one line saying what to do when it cannot join."""
    if ray.is_initialized():
        return
    quiet = {"logging_level": "ERROR", "log_to_driver": False}
    if address is None:
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", **quiet)
        return
    try:
        ray.init(address=address, **quiet)
    except ConnectionError as exc:
        # Ray enables a token it finds only for 'auto'; an explicit address needs the mode set by the user.
        explicit = address != "auto" and os.environ.get("RAY_AUTH_MODE") is None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "cannot connect"
        raise ConnectionError(f"Ray at {address}: {first}{AUTH_HINT if explicit else ''}") from None
