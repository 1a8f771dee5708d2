"""``fl-ec-run``: ``flwr run`` with a pre-flight check and an honest exit code.

``flwr run . --stream`` exits 0 even when the run failed, and a bad knob surfaces
only after Flower's ~30 s start-up. This wrapper

1. merges ``[tool.flwr.app.config]`` with the ``--run-config`` overrides and validates
   them with :class:`~fl_ec.config.ExperimentConfig` -- and checks the dataset is
   there -- before Flower starts (one line and exit code 2 on a problem);
2. submits the run (``flwr run --format json``), streams its logs (``flwr log``);
3. reads the final status with ``flwr ls --run-id`` and exits 0 only for
   ``finished:completed`` (otherwise prints the status details, exit 1).

For a local simulation it also passes ``results-dir`` as an absolute path under the
app's folder: the ServerApp runs in the local SuperLink's working directory, which is
wherever the first ``flwr run`` on the machine started it, so a relative folder would
land in that other project. And it stops the local SuperLink when the run ends if
this run started it (``--keep-superlink`` keeps it, e.g. for ``flwr log``); one that
was already running is left as it was.

The same :class:`FlowerCli` drives the integration tests and the benchmarks, with an
isolated ``FLWR_HOME`` and ports so runs never reuse someone else's SuperLink.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fl_ec.config import ExperimentConfig
from fl_ec.data.federated import server_holdout
from fl_ec.data.sources import load_fashion_mnist, locate_fashion_mnist
from fl_ec.errors import FlEcError

DEFAULT_SUPERNODES = 20  # the partial-participation federation of the default run


def app_defaults(app_dir: Path) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of the app's pyproject.toml."""
    with open(Path(app_dir) / "pyproject.toml", "rb") as handle:
        return dict(tomllib.load(handle)["tool"]["flwr"]["app"]["config"])


def parse_overrides(text: str) -> dict[str, Any]:
    """Parse ``"k1=v1 k2='s'"`` exactly as ``flwr run --run-config`` does."""
    if not text.strip():
        return {}
    from flwr.common.config import parse_config_args

    try:
        return dict(parse_config_args([text]))
    except Exception:  # flwr raises click/typer exceptions on bad syntax
        raise FlEcError(
            f'--run-config {text!r} is malformed: use k1=v1 k2="text" (TOML values, strings quoted)'
        ) from None


def format_overrides(values: dict[str, Any]) -> str:
    """The inverse of :func:`parse_overrides`: ``{"a": 1, "b": "x"}`` -> ``a=1 b="x"``."""

    def toml_value(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        return json.dumps(value) if isinstance(value, str) else repr(value)

    return " ".join(f"{key}={toml_value(value)}" for key, value in values.items())


def merge_overrides(*texts: str) -> str:
    """Merge run-config strings; later keys win (flwr rejects a repeated key)."""
    merged: dict[str, Any] = {}
    for text in texts:
        merged.update(parse_overrides(text))
    return format_overrides(merged)


def preflight(
    app_dir: Path, overrides: dict[str, Any], num_partitions: int | None = None
) -> ExperimentConfig:
    """Validate the merged run-config and the data, without starting Flower.

    With ``num_partitions`` (the simulation's SuperNode count) it also checks that
    the client pool can be split that many ways.
    """
    defaults = app_defaults(app_dir)
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise FlEcError(
            f"unknown run-config key(s) {', '.join(unknown)}: see [tool.flwr.app.config] "
            "in pyproject.toml or the README's knob table"
        )
    config = ExperimentConfig.from_run_config({**defaults, **overrides})
    data = config.data
    if data.dataset == "fashion-mnist":
        locate_fashion_mnist(data.data_dir, data.download)
    if num_partitions is not None and data.dataset == "fashion-mnist":
        train, _ = load_fashion_mnist(data.data_dir, data.download)
        pool = server_holdout(data, config.seed, len(train)).client_pool
        if num_partitions > len(pool):
            raise FlEcError(
                f"num-partitions={num_partitions} exceeds the {len(pool)} client training "
                "samples: use fewer SuperNodes or a larger train-subset"
            )
    return config


def absolute_results_dir(app_dir: Path, run_config: str) -> tuple[str, Path]:
    """``run_config`` with ``results-dir`` (given or the app's default) absolute, a
    relative one taken under ``app_dir``; and that folder."""
    overrides = parse_overrides(run_config)
    given = overrides.get("results-dir", app_defaults(app_dir).get("results-dir", "results"))
    results = Path(str(given)).expanduser()
    if not results.is_absolute():
        results = Path(app_dir).resolve() / results
    overrides["results-dir"] = str(results)
    return format_overrides(overrides), results


def flower_env() -> dict[str, str]:
    """``os.environ`` with this interpreter's bin dir first on PATH.

    ``flwr`` spawns ``flower-superlink``, which spawns ``flwr-serverapp`` and
    ``flwr-simulation``, all by name. Running ``.venv/bin/python`` without activating
    the venv (as ``make test`` does) would otherwise not find them.
    """
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    if env.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    return env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunOutcome:
    run_id: int
    status: str
    details: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"


class FlowerCli:
    """The ``flwr`` command line with its own environment (home, ports).

    ``isolated=True`` creates a private ``FLWR_HOME`` and free ports, so the local
    SuperLink this starts is this object's alone; :meth:`stop_local_superlink` ends it.
    """

    def __init__(
        self, home: Path | None = None, isolated: bool = False, superlink: str | None = None
    ) -> None:
        self.env = flower_env()
        if home is not None:
            Path(home).mkdir(parents=True, exist_ok=True)
            self.env["FLWR_HOME"] = str(home)
        if isolated:
            self.env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(free_port())
            self.env["FLWR_LOCAL_CONTROL_API_PORT"] = str(free_port())
        self.superlink = superlink

    def _cmd(self, *args: str) -> list[str]:
        return ["flwr", *args, *([self.superlink] if self.superlink else [])]

    def submit(
        self,
        app_dir: Path,
        run_config: str = "",
        num_supernodes: int | None = None,
        federation_config: str = "",
    ) -> int:
        """Submit a run; its id. ``federation_config``: more simulation settings
        (``"client-resources-num-cpus=1"``), with ``num_supernodes``."""
        args = ["run", str(app_dir)]
        if run_config:
            args += ["--run-config", run_config]
        if num_supernodes is not None:
            federation_config = f"num-supernodes={num_supernodes} {federation_config}".strip()
        if federation_config:
            args += ["--federation-config", federation_config]
        proc = subprocess.run(
            self._cmd(*args, "--format", "json"),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        try:
            reply = json.loads(proc.stdout[proc.stdout.index("{") :])
            return int(reply["run-id"])
        except (ValueError, KeyError):
            raise FlEcError(
                f"flwr run failed to submit: {(proc.stdout + proc.stderr).strip()[-400:]}"
            ) from None

    def register_supernode(self, public_key: Path) -> None:
        """Register a SuperNode's public key with the SuperLink (SuperNode authentication)."""
        proc = subprocess.run(
            self._cmd("supernode", "register", str(public_key)),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            raise FlEcError(
                f"flwr supernode register {public_key.name} failed: "
                f"{(proc.stdout + proc.stderr).strip()[-400:]}"
            )

    def stream_logs(self, run_id: int) -> None:
        subprocess.run(self._cmd("log", str(run_id), "--stream"), env=self.env, check=False)

    def logs(self, run_id: int) -> str:
        proc = subprocess.run(
            self._cmd("log", str(run_id), "--show"),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        return proc.stdout + proc.stderr

    def status(self, run_id: int) -> dict[str, Any]:
        proc = subprocess.run(
            self._cmd("ls", "--run-id", str(run_id), "--format", "json"),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        try:
            runs = json.loads(proc.stdout[proc.stdout.index("{") :])["runs"]
        except (ValueError, KeyError):
            return {"status": "unknown", "status-details": proc.stdout + proc.stderr}
        return runs[0] if runs else {"status": "unknown", "status-details": "run not listed"}

    def wait(
        self, run_id: int, timeout: float = 1800, poll: float = 2.0, follow: bool = True
    ) -> RunOutcome:
        """Block until the run has finished (or ``timeout`` seconds); its outcome.

        With ``follow`` one quiet ``flwr log --stream`` waits for the end first: the
        SuperLink closes the stream when the run finishes. Polling ``flwr ls`` alone
        starts a Python process every ``poll`` seconds (about 1.4 s of CPU each), which a
        2-core machine takes from the run it waits for. ``flwr ls`` then reads the
        outcome, polling only while the run is not yet finished (the stream ended early:
        the run had not started, or the connection dropped). Callers that streamed the
        logs themselves pass ``follow=False``.
        """
        deadline = time.monotonic() + timeout
        if follow:
            with contextlib.suppress(subprocess.TimeoutExpired):
                subprocess.run(
                    self._cmd("log", str(run_id), "--stream"),
                    env=self.env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=timeout,
                    check=False,
                )
        while True:
            info = self.status(run_id)
            status = str(info.get("status", "unknown"))
            if status.startswith("finished") or time.monotonic() > deadline:
                return RunOutcome(run_id, status, str(info.get("status-details", "")), info)
            time.sleep(poll)

    def local_superlink_pids(self) -> list[int]:
        """PIDs of the detached ``flower-superlink`` that local runs of this CLI use."""
        port = self.env.get("FLWR_LOCAL_CONTROL_API_PORT", "39093")
        return process_pids("flower-superlink", f"127.0.0.1:{port}")

    def stop_local_superlink(self) -> list[int]:
        """Kill the detached ``flower-superlink`` a ``:local:`` run started, by PID."""
        pids = self.local_superlink_pids()
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        return pids


def process_pids(program: str, argument: str) -> list[int]:
    """PIDs of running ``program`` processes with ``argument`` among their arguments
    (Linux /proc), e.g. the ``flower-superlink`` serving one address."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        text = [a.decode(errors="replace") for a in argv]
        if any(a.endswith(program) for a in text) and argument in text:
            pids.append(int(entry.name))
    return pids


def add_run_arguments(parser: argparse.ArgumentParser, run_config_help: str) -> None:
    """The arguments every fl-ec command that submits runs takes: the app, the SuperLink,
    ``--run-config`` and ``--supernodes``."""
    parser.add_argument("app", nargs="?", default=".", help="app directory (default: .)")
    parser.add_argument(
        "superlink",
        nargs="?",
        default=None,
        help="SuperLink connection name from $FLWR_HOME/config.toml (default: a local "
        "simulation)",
    )
    parser.add_argument("--run-config", "-c", default="", help=run_config_help)
    parser.add_argument(
        "--supernodes",
        type=int,
        default=DEFAULT_SUPERNODES,
        help=f"simulated SuperNodes for a local simulation (default: {DEFAULT_SUPERNODES}); "
        "ignored by a deployment SuperLink",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fl-ec-run",
        description="Run the fl-ec Flower app (flwr run) with a pre-flight config check "
        "and an exit code that reflects the run's final status.",
    )
    add_run_arguments(parser, 'overrides, e.g. "num-server-rounds=3 alpha=0.1"')
    parser.add_argument(
        "--keep-superlink",
        action="store_true",
        help="leave the local SuperLink this run starts running (for flwr log / flwr ls)",
    )
    args = parser.parse_args(argv)
    app_dir = Path(args.app).resolve()
    local = args.superlink is None
    run_config = args.run_config
    try:
        preflight(app_dir, parse_overrides(run_config), args.supernodes if local else None)
        cli = FlowerCli(superlink=args.superlink)
        if local:
            run_config, results = absolute_results_dir(app_dir, run_config)
            print(f"fl-ec: results -> {results}", flush=True)
        already_running = cli.local_superlink_pids() if local else []
        run_id = cli.submit(app_dir, run_config, args.supernodes if local else None)
    except FlEcError as err:
        print(f"fl-ec error: {err}", file=sys.stderr)
        return 2
    print(f"fl-ec: submitted run {run_id}; streaming its logs", flush=True)
    try:
        cli.stream_logs(run_id)
        outcome = cli.wait(run_id, timeout=120, follow=False)
    finally:
        if local:
            leave_local_superlink(cli, already_running, args.keep_superlink)
    if not outcome.completed:
        print(f"fl-ec: run {run_id} ended as {outcome.status}: {outcome.details}", file=sys.stderr)
        return 1
    print(f"fl-ec: run {run_id} {outcome.status}")
    return 0


def leave_local_superlink(cli: FlowerCli, already_running: list[int], keep: bool) -> None:
    """Stop the local SuperLink if this run started it and ``keep`` is off; say which."""
    if already_running:
        print(f"fl-ec: the local SuperLink (pid {already_running[0]}) was running before this "
              "run and is left running", flush=True)
    elif keep:
        pids = cli.local_superlink_pids()
        print(f"fl-ec: the local SuperLink (pid {', '.join(map(str, pids))}) keeps running "
              "(--keep-superlink); stop it with kill", flush=True)
    else:
        pids = cli.stop_local_superlink()
        if pids:
            print(f"fl-ec: stopped the local SuperLink this run started (pid "
                  f"{', '.join(map(str, pids))}); --keep-superlink keeps it", flush=True)


if __name__ == "__main__":
    sys.exit(main())
