"""A real Flower deployment on 127.0.0.1: one SuperLink, N SuperNodes, stopped by PID.

    python -m fl_ec.deploy up --supernodes 2      # start, write .deploy/state.json
    python -m fl_ec.deploy up --tls --auth        # the same over TLS, SuperNodes authenticated
    python -m fl_ec.deploy run -c "num-server-rounds=1"   # flwr run . against it
    python -m fl_ec.deploy down                   # SIGTERM every PID, then SIGKILL

Unlike the simulation engine, every SuperNode is its own process (each spawns its
ClientApp in a subprocess) talking to the SuperLink's Fleet API, exactly as on separate
machines -- only the addresses are loopback. The connection is registered as
``fl-ec-local`` in ``$FLWR_HOME/config.toml`` so plain ``flwr run . fl-ec-local`` works
too. Each node gets ``partition-id``/``num-partitions`` (and optional capability knobs)
through ``--node-config``.

``--tls`` makes a certificate authority and a SuperLink certificate
(:mod:`fl_ec.credentials`) in ``<state-dir>/certificates``: the SuperLink serves TLS,
SuperNodes and ``flwr`` trust only that CA. ``--auth`` (needs ``--tls``) adds SuperNode
authentication: one key pair per SuperNode in ``<state-dir>/keys``, each public key
registered with ``flwr supernode register`` before its node starts, and the SuperLink
started with ``--enable-supernode-auth``, so a node whose key was not registered is
refused. Without ``--tls`` everything is ``--insecure``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fl_ec.credentials import make_certificates, make_supernode_key
from fl_ec.errors import FlEcError
from fl_ec.launch import FlowerCli, flower_env, free_port, merge_overrides

CONNECTION = "fl-ec-local"


@dataclass
class DeploymentState:
    """What ``down`` needs: PIDs, ports and where the logs are."""

    state_dir: str
    flwr_home: str
    address: str
    superlink_pid: int = 0
    supernode_pids: list[int] = field(default_factory=list)
    ca_certificate: str = ""  # with TLS: the CA SuperNodes and flwr trust
    auth: bool = False  # SuperNodes authenticate with registered keys

    def save(self) -> Path:
        path = Path(self.state_dir) / "state.json"
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, state_dir: Path) -> DeploymentState:
        path = Path(state_dir) / "state.json"
        if not path.is_file():
            raise FlEcError(f"no deployment state in {state_dir}: start one with 'up' first")
        return cls(**json.loads(path.read_text()))


def _register_connection(flwr_home: Path, address: str, ca_certificate: str = "") -> None:
    """Add/replace the ``[superlink.fl-ec-local]`` connection in config.toml."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    config = flwr_home / "config.toml"
    text = (
        config.read_text()
        if config.exists()
        else '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n'
    )
    header = f"[superlink.{CONNECTION}]"
    if header in text:  # drop the old block (up to the next table header)
        start = text.index(header)
        nxt = text.find("\n[", start + len(header))
        text = text[:start] + (text[nxt + 1 :] if nxt != -1 else "")
    transport = (
        f'root-certificates = "{ca_certificate}"\n' if ca_certificate else "insecure = true\n"
    )
    text = text.rstrip() + f'\n\n{header}\naddress = "{address}"\n{transport}'
    config.write_text(text)


def _wait_for_port(address: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    import socket

    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FlEcError(f"process exited with code {proc.returncode}; see {log}")
        with socket.socket() as sock:
            if sock.connect_ex((host, int(port))) == 0:
                return
        time.sleep(0.2)
    raise FlEcError(f"nothing listens on {address} after {timeout:.0f}s; see {log}")


def up(
    num_supernodes: int,
    state_dir: Path,
    flwr_home: Path,
    node_configs: list[str] | None = None,
    tls: bool = False,
    auth: bool = False,
) -> DeploymentState:
    """Start a SuperLink and ``num_supernodes`` SuperNodes; return their PIDs and ports."""
    if num_supernodes < 1:
        raise FlEcError(f"--supernodes={num_supernodes} must be >= 1")
    if auth and not tls:
        raise FlEcError("--auth needs --tls: SuperNode keys must not travel unencrypted")
    state_dir.mkdir(parents=True, exist_ok=True)
    env = dict(flower_env(), FLWR_HOME=str(flwr_home))
    # Since Flower 1.41 the SuperLink serves its Fleet, Control and Runtime APIs over
    # one HTTP address (--host/--port); SuperNodes and `flwr` both connect to it.
    port = free_port()
    address = f"127.0.0.1:{port}"
    state = DeploymentState(str(state_dir), str(flwr_home), address, auth=auth)
    transport = ["--insecure"]
    if tls:
        certificates = make_certificates(state_dir / "certificates")
        state.ca_certificate = str(certificates.ca_certificate)
        transport = [
            "--ssl-ca-certfile",
            str(certificates.ca_certificate),
            "--ssl-certfile",
            str(certificates.certificate),
            "--ssl-keyfile",
            str(certificates.key),
        ]
    if auth:
        transport.append("--enable-supernode-auth")
    log = state_dir / "superlink.log"
    superlink = subprocess.Popen(
        [
            "flower-superlink",
            *transport,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--database",
            str(state_dir / "state.db"),
        ],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    state.superlink_pid = superlink.pid
    state.save()
    try:
        _wait_for_port(address, 60, superlink, log)
        # Before the nodes: registering their keys goes through this connection.
        _register_connection(flwr_home, address, state.ca_certificate)
        cli = FlowerCli(home=flwr_home, superlink=CONNECTION)
        for i in range(num_supernodes):
            # The node's own settings win over the partition it would get by default.
            extra = node_configs[i % len(node_configs)] if node_configs else ""
            node_config = merge_overrides(
                f"partition-id={i} num-partitions={num_supernodes}", extra
            )
            key = None
            if auth:
                key = make_supernode_key(state_dir / "keys", f"supernode-{i}")
                cli.register_supernode(key.public_key)
            node = start_supernode(
                state, f"supernode-{i}", node_config, key.private_key if key else None
            )
            state.supernode_pids.append(node.pid)
            state.save()
    except BaseException:
        down(state)
        raise
    return state


def start_supernode(
    state: DeploymentState,
    name: str,
    node_config: str,
    private_key: Path | None = None,
    transport: list[str] | None = None,
) -> subprocess.Popen:
    """Start one SuperNode of ``state``'s deployment; its log is ``<state-dir>/<name>.log``.

    ``transport``: the connection flags, by default the deployment's own
    (``--root-certificates <CA>`` with TLS, else ``--insecure``).
    """
    if transport is None:
        transport = (
            ["--root-certificates", state.ca_certificate]
            if state.ca_certificate
            else ["--insecure"]
        )
    if private_key is not None:
        transport = [*transport, "--auth-supernode-private-key", str(private_key)]
    log = Path(state.state_dir) / f"{name}.log"
    return subprocess.Popen(
        [
            "flower-supernode",
            *transport,
            "--superlink",
            state.address,
            "--node-config",
            node_config,
            # Each SuperNode serves its ClientApp on its own port.
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
        ],
        env=dict(flower_env(), FLWR_HOME=state.flwr_home),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def down(state: DeploymentState, grace: float = 10.0) -> list[int]:
    """SIGTERM each process group (node + its ClientApp children), then SIGKILL stragglers."""
    pids = [*state.supernode_pids, state.superlink_pid]
    pids = [p for p in pids if p > 0]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    # Reap our own children when we started them in this process (tests do).
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
    return pids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fl_ec.deploy", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("action", choices=["up", "run", "down"])
    parser.add_argument("--supernodes", type=int, default=2)
    parser.add_argument("--tls", action="store_true", help="TLS with a new local CA")
    parser.add_argument(
        "--auth", action="store_true", help="SuperNode authentication (needs --tls)"
    )
    parser.add_argument("--state-dir", type=Path, default=Path(".deploy"))
    parser.add_argument(
        "--flwr-home", type=Path, default=Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
    )
    parser.add_argument("--run-config", "-c", default="")
    parser.add_argument("--app", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            state = up(
                args.supernodes,
                args.state_dir.resolve(),
                args.flwr_home.resolve(),
                tls=args.tls,
                auth=args.auth,
            )
            security = "insecure"
            if state.ca_certificate:
                security = "TLS" + (" + SuperNode authentication" if state.auth else "")
            print(
                f"fl-ec: SuperLink pid {state.superlink_pid} on {state.address} ({security}); "
                f"SuperNode pids {state.supernode_pids}; "
                f"connection '{CONNECTION}' in {args.flwr_home}/config.toml"
            )
        elif args.action == "run":
            state = DeploymentState.load(args.state_dir)
            cli = FlowerCli(home=Path(state.flwr_home), superlink=CONNECTION)
            run_id = cli.submit(args.app.resolve(), args.run_config)
            print(f"fl-ec: run {run_id} submitted to {CONNECTION}", flush=True)
            cli.stream_logs(run_id)
            outcome = cli.wait(run_id, timeout=600, follow=False)
            print(f"fl-ec: run {run_id} {outcome.status} {outcome.details}")
            return 0 if outcome.completed else 1
        else:
            pids = down(DeploymentState.load(args.state_dir))
            print(f"fl-ec: stopped pids {pids}")
    except FlEcError as err:
        print(f"fl-ec error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
