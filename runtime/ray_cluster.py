"""Joining Ray, shared by `sd-run serve --ray` and `sd-run batch --ray` (needs the `[ray]` extra)."""

from __future__ import annotations

import ipaddress
import os
import secrets

import ray

AUTH_HINT = (
    "; a cluster started by `ray start` uses token authentication: give its address as 'auto' on one of its "
    "machines, or set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (see docs/scale-out.md)"
)

# What a private cluster sets in this process's environment, which Ray's processes inherit: RAY_AUTH_TOKEN is
# the first place Ray looks for a token, so neither RAY_AUTH_TOKEN_PATH nor ~/.ray/auth_token is read or written.
_AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
_user_auth_env: dict[str, str | None] | None = None  # the user's values, while a private token replaces them


def connect(address: str | None) -> None:
    """Join the cluster at `address` ("auto": the one this machine is part of), or (None) start a private Ray
    on this machine: every port it opens listens on 127.0.0.1 only, and it requires a random token that only
    this process and the processes Ray starts from it know. Raises ConnectionError with one line saying what
    to do when it cannot join."""
    if ray.is_initialized():
        return
    if address is None:
        _start_private()
        return
    _restore_user_auth()  # a private cluster run before in this process leaves no token behind
    quiet = {"logging_level": "ERROR", "log_to_driver": False}
    try:
        ray.init(address=address, **quiet)
    except ConnectionError as exc:
        # Ray enables a token it finds only for 'auto'; an explicit address needs the mode set by the user.
        explicit = address != "auto" and os.environ.get("RAY_AUTH_MODE") is None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "cannot connect"
        raise ConnectionError(f"Ray at {address}: {first}{AUTH_HINT if explicit else ''}") from None


def _start_private() -> None:
    """A new single-node Ray bound to loopback, with token authentication on a token of its own.

    Ray's processes (GCS, raylet with its object manager, workers, dashboard and runtime-env agents, metrics
    exporters) listen on 127.0.0.1 only when the node's IP address is 127.0.0.1, but `ray.init` replaces a
    loopback `_node_ip_address` with the machine's network address unless Ray treats the machine as
    single-node, as it does on macOS and Windows (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`). That switch is read
    once, when ray is imported, so it is turned off for the duration of `ray.init` instead. If the node still
    comes up on another address (a Ray that decides differently), the cluster is stopped and RuntimeError
    raised rather than serving on the network."""
    _use_private_token(secrets.token_hex(32))
    from ray._private import ray_constants

    multi_node = getattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        # "local": a new cluster even when RAY_ADDRESS is set or a `ray start` cluster runs on this machine.
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="ERROR",
                 log_to_driver=False)  # fmt: skip
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = multi_node
    node_ip = _node_ip()
    if not _is_loopback(node_ip):
        ray.shutdown()
        raise RuntimeError(f"the private Ray came up on {node_ip}, not 127.0.0.1: stopped it rather than expose it")


def loopback_serve_replica() -> None:
    """Called in a Serve replica (our deployments' constructors, which Serve runs before the replica starts its
    servers): on a private Ray, bind the replica's inter-deployment gRPC server to the node's loopback address.
    Ray Serve 2.60 binds it to `[::]:0` whatever the node's address, with no setting for it; its peers reach it
    at the node's address, which is loopback on a private Ray. Nothing changes on a real cluster, or with a
    Serve that has no such function; tests/test_ray_private.py notices if the bind moves elsewhere."""
    node_ip = _node_ip()
    if not _is_loopback(node_ip):
        return
    host = f"[{node_ip}]" if ":" in node_ip else node_ip
    try:
        from ray.serve._private import replica
    except ImportError:
        return
    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None or getattr(bind, "loopback_only", False):
        return

    def loopback(server, address: str):
        wildcard, _, port = address.rpartition(":")
        return bind(server, f"{host}:{port}" if wildcard in ("[::]", "0.0.0.0", "") else address)

    loopback.loopback_only = True
    replica.add_port_to_grpc_server = loopback


def _node_ip() -> str:
    return ray.util.get_node_ip_address()


def _is_loopback(host: str) -> bool:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _use_private_token(token: str) -> None:
    global _user_auth_env
    if _user_auth_env is None:
        _user_auth_env = {name: os.environ.get(name) for name in _AUTH_VARS}
    os.environ.pop("RAY_AUTH_TOKEN_PATH", None)
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = token
    _reload_auth()


def _restore_user_auth() -> None:
    global _user_auth_env
    if _user_auth_env is None:
        return
    for name, value in _user_auth_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _user_auth_env = None
    _reload_auth()


def _reload_auth() -> None:
    """Ray caches the mode (RayConfig) and the token in this process: make it read them from the environment
    again, as Ray's own `_enable_token_auth` does (a Ray without token authentication has nothing to reload)."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
