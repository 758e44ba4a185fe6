"""The private Ray of `sd-run serve --ray` / `sd-run batch --ray` without `--address` is private: with the
shipped model deployed on it, no process of its tree listens outside loopback, and a client without the
cluster's own random token is refused while one with it joins. Linux only (reads /proc)."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
httpx = pytest.importorskip("httpx")
if not Path("/proc/net/tcp").exists():
    pytest.skip("needs Linux /proc", allow_module_level=True)

from ray import serve  # noqa: E402

from sd_onnx.runtime import ray_cluster  # noqa: E402
from sd_onnx.runtime.server.ray_serve import RayOptions, deploy  # noqa: E402
from sd_onnx.runtime.server.state import ServeConfig  # noqa: E402
from sd_onnx.runtime.shipped import shipped_model  # noqa: E402

AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")


def test_the_private_token_is_new_each_time_and_the_users_settings_come_back(monkeypatch):
    """Without a cluster: what `ray.init` is given and sees, and that `connect(address)` afterwards runs with
    the user's own auth settings (runs before the fixture below starts a real cluster in this process)."""
    if ray.is_initialized():
        pytest.skip("needs a process without a connected Ray")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # must not turn the private Ray into a join
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/users/own/token")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    seen = []

    def fake_init(address=None, **kwargs):
        from ray._private import ray_constants

        seen.append((address, {name: os.environ.get(name) for name in AUTH_VARS}, ray_constants.ENABLE_RAY_CLUSTER))

    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(ray_cluster, "_node_ip", lambda: "127.0.0.1")
    ray_cluster.connect(None)
    ray_cluster.connect(None)  # a second private cluster in the same process (after ray.shutdown)
    ray_cluster.connect("auto")
    (first, env1, single1), (second, env2, single2), (joined, env3, single3) = seen
    assert first == second == "local" and joined == "auto"
    assert env1["RAY_AUTH_MODE"] == env2["RAY_AUTH_MODE"] == "token" and env1["RAY_AUTH_TOKEN_PATH"] is None
    assert len(env1["RAY_AUTH_TOKEN"]) == 64 and env1["RAY_AUTH_TOKEN"] != env2["RAY_AUTH_TOKEN"]
    assert env3 == {"RAY_AUTH_MODE": None, "RAY_AUTH_TOKEN": None, "RAY_AUTH_TOKEN_PATH": "/users/own/token"}
    from ray._private import ray_constants

    assert (single1, single2, single3) == (False, False, True) and ray_constants.ENABLE_RAY_CLUSTER


def test_a_private_ray_that_comes_up_on_the_network_is_stopped(monkeypatch):
    if ray.is_initialized():
        pytest.skip("needs a process without a connected Ray")
    stopped = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(ray, "shutdown", lambda: stopped.append(True))
    monkeypatch.setattr(ray_cluster, "_node_ip", lambda: "192.0.2.7")
    with pytest.raises(RuntimeError, match="came up on 192.0.2.7, not 127.0.0.1"):
        ray_cluster.connect(None)
    assert stopped == [True]
    ray_cluster._restore_user_auth()


@pytest.fixture(scope="module")
def private_ray():
    """`sd-run serve --ray`'s path: deploy() without an address starts the private Ray (one replica)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = ServeConfig(queue_size=1, public_url=f"http://127.0.0.1:{port}")
    deploy(shipped_model(), config, RayOptions(replicas=1), threads=1, port=port)
    yield {"port": port, "gcs": ray.get_runtime_context().gcs_address, "token": os.environ["RAY_AUTH_TOKEN"]}
    serve.shutdown()
    ray.shutdown()
    ray_cluster._restore_user_auth()


def process_tree(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = set(), [root]
    while todo:
        pid = todo.pop()
        tree.add(pid)
        todo.extend(children.get(pid, []))
    return tree


def socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes


def decode(field: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """/proc/net/tcp{,6}'s HEXADDR:PORT: the address as 32-bit words in this (little-endian) host's order."""
    host, port = field.split(":")
    raw = bytes.fromhex(host)
    return ipaddress.ip_address(b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))), int(port, 16)


def listening(pids: set[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every listening TCP socket (IPv4 and IPv6) the processes hold."""
    owner = {inode: pid for pid in pids for inode in socket_inodes(pid)}
    found = []
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in owner:  # 0A: LISTEN
                address, port = decode(fields[1])
                found.append((owner[fields[9]], str(address), port))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1, how gRPC binds 127.0.0.1 on a v6 socket
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "?"


def test_every_port_of_the_private_ray_listens_on_loopback_only(private_ray):
    assert httpx.get(f"http://127.0.0.1:{private_ray['port']}/health", timeout=30).status_code == 200
    tree = process_tree(os.getpid())
    sockets = listening(tree)
    exposed = [(pid, command(pid)[:100], address, port) for pid, address, port in sockets if not is_loopback(address)]
    assert not exposed, exposed
    # The enumeration saw the whole cluster: every port Ray reports for the node, the GCS and Serve's proxy.
    (node,) = ray.nodes()
    assert node["NodeManagerAddress"] == "127.0.0.1"
    names = ("NodeManagerPort", "ObjectManagerPort", "MetricsExportPort", "MetricsAgentPort",
             "DashboardAgentListenPort", "RuntimeEnvAgentPort")  # fmt: skip
    expected = {node[name] for name in names if node.get(name)} | {int(private_ray["gcs"].rsplit(":", 1)[1])}
    expected.add(private_ray["port"])
    assert expected <= {port for _, _, port in sockets}, (expected, sockets)
    assert len({pid for pid, _, _ in sockets}) >= 5  # driver, GCS, raylet, agents, Serve's actors


def join(gcs: str, extra: dict[str, str]) -> subprocess.CompletedProcess:
    """A client in another process: the auth settings of this one removed, `extra` added. Loopback-only Ray is
    reached from another process only as single-node (otherwise Ray rewrites 127.0.0.1 to the network
    address); refusals are checked with the GCS client (a refused `ray.init` retries for 20 s)."""
    env = {name: value for name, value in os.environ.items() if name not in AUTH_VARS}
    env.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **extra})
    code = (
        "import sys, ray\n"
        "from ray._raylet import GcsClient\n"
        "GcsClient(address=sys.argv[1]).internal_kv_keys(b'', None, timeout=10)\n"
        "ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False)\n"
        "print('joined', ray.cluster_resources()['CPU'])\n"
    )
    return subprocess.run([sys.executable, "-c", code, gcs], env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "extra",
    [{"RAY_AUTH_MODE": "disabled"}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}],
    ids=["no-token", "another-token"],
)
def test_a_client_without_the_cluster_token_is_refused(private_ray, extra):
    answer = join(private_ray["gcs"], extra)
    assert answer.returncode != 0 and "joined" not in answer.stdout
    assert "AuthenticationError" in answer.stderr and "InvalidAuthToken" in answer.stderr, answer.stderr[-2000:]


def test_a_client_with_the_token_joins_and_the_token_is_in_no_log_or_command_line(private_ray):
    answer = join(private_ray["gcs"], {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": private_ray["token"]})
    assert answer.returncode == 0 and "joined" in answer.stdout, answer.stderr[-2000:]
    token = private_ray["token"].encode()
    assert not [pid for pid in process_tree(os.getpid()) if token in command(pid).encode()]
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    logged = [path for path in session.rglob("*") if path.is_file() and token in path.read_bytes()]
    assert not logged, logged
