"""FedAvg, FedEC and FedHCE in Flower's quickstart-pytorch app, side by side, per seed.

The app is tests/quickstart_app: Flower's example (its ``Net``, flwr-datasets IID
partitions with dict batches, a stock ClientApp) on Fashion-MNIST. Each method is the
same app with only its strategy changed (FedHCE: plus the two ClientApp lines). Every
final model is scored on the same 7,000 test images that none of the strategies saw
(the rest of ``hold_out(test, proxy=2000, validation=1000)``), so FedAvg, which does not
hold anything out, is scored on the same images as the others.

    python simulations/quickstart_benchmark.py --seeds 0 1 2 --rounds 3 --supernodes 3

The app seeds only the initial model (``torch.manual_seed(seed)`` in its ServerApp);
client batch order is unseeded, as in Flower's example.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from benchkit import ROOT
from benchkit.report import command_line, date_line, detected_device, machine_line, write_section

from fl_ec.launch import FlowerCli

APP = ROOT / "tests" / "quickstart_app"

# method -> (ServerApp module, ClientApp module)
METHODS = {
    "fedavg": ("server_app", "client_app"),
    "fedec": ("server_app_fedec", "client_app"),
    "fedhce": ("server_app_fedhce", "client_app_fedhce"),
}


def app_copy(workdir: Path, method: str) -> Path:
    """tests/quickstart_app with the method's ServerApp and ClientApp as components."""
    server, client = METHODS[method]
    app = workdir / f"app-{method}"
    if app.exists():  # made for an earlier seed
        return app
    shutil.copytree(APP, app)
    pyproject = app / "pyproject.toml"
    text = pyproject.read_text()
    text = text.replace("quickstart_app.server_app:app", f"quickstart_app.{server}:app")
    text = text.replace("quickstart_app.client_app:app", f"quickstart_app.{client}:app")
    pyproject.write_text(text)
    return app


def run(method: str, seed: int, rounds: int, supernodes: int, workdir: Path) -> dict:
    """One ``flwr run`` of the app; its final model and per-round server accuracy."""
    app = app_copy(workdir, method)
    results = workdir / f"{method}-s{seed}"
    config = f'num-server-rounds={rounds} seed={seed} results-file="{results}"'
    cli = FlowerCli(home=workdir / f"home-{method}-{seed}", isolated=True)
    started = dt.datetime.now()
    try:
        run_id = cli.submit(app, config, supernodes)
        print(f"[quickstart] {method} seed {seed}: run {run_id}", flush=True)
        outcome = cli.wait(run_id, timeout=3600, poll=5)
    finally:
        cli.stop_local_superlink()
    if not outcome.completed:
        raise SystemExit(f"[quickstart] {method} seed {seed} ended {outcome.status}")
    return {
        "seconds": (dt.datetime.now() - started).total_seconds(),
        "rounds": json.loads(results.with_suffix(".json").read_text()),
        "state": torch.load(results.with_suffix(".pt"), weights_only=True),
    }


def import_app_package() -> None:
    """Register the app's ``quickstart_app`` package from its folder, as if installed.

    Its modules import each other as ``quickstart_app.*``, which ``flwr run`` resolves
    from the app's folder; here the package is loaded from that folder by location, so
    those imports resolve the same way without installing the app.
    """
    if "quickstart_app" in sys.modules:
        return
    package = APP / "quickstart_app"
    spec = importlib.util.spec_from_file_location(
        "quickstart_app", package / "__init__.py", submodule_search_locations=[str(package)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["quickstart_app"] = module
    spec.loader.exec_module(module)


def held_out_accuracy(state: dict) -> float:
    """The final model's accuracy on the test images no strategy saw."""
    import_app_package()
    from quickstart_app.server_app_fedec import held
    from quickstart_app.task import Net, test

    model = Net()
    model.load_state_dict(state)
    loader = torch.utils.data.DataLoader(held.rest, batch_size=256)
    return test(model, loader, torch.device("cpu"))[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--supernodes", type=int, default=3)
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--section", default="quickstart-drop-in")
    args = parser.parse_args()
    started = dt.datetime.now()
    scores: dict[str, dict[int, tuple[float, float]]] = {m: {} for m in args.methods}
    with tempfile.TemporaryDirectory(prefix="flec-quickstart-") as tmp:
        for seed in args.seeds:
            for method in args.methods:
                outcome = run(method, seed, args.rounds, args.supernodes, Path(tmp))
                accuracy = held_out_accuracy(outcome["state"])
                scores[method][seed] = (accuracy, outcome["seconds"])
                print(f"[quickstart] {method} seed {seed}: {100 * accuracy:.2f}%", flush=True)
    minutes = (dt.datetime.now() - started).total_seconds() / 60
    lines = [
        f"## {args.section} (Flower's quickstart-pytorch app: {args.supernodes} SuperNodes, "
        f"IID partitions, {args.rounds} rounds x 1 local epoch; Fashion-MNIST)",
        "",
        command_line("quickstart_benchmark.py"),
        date_line(started, minutes, prefix="total "),
        machine_line(detected_device(named=False)),
        "- Accuracy: the final model on the 7,000 test images outside the server's hold-out "
        "(proxy 2,000 + validation 1,000), the same images for every method.",
        "",
        "| method | accuracy per seed | mean ± sd | Δ vs FedAvg, mean | run s, mean |",
        "|---|---|---|---|---|",
    ]
    base = scores.get("fedavg", {})
    for method, by_seed in scores.items():
        accs = [by_seed[s][0] * 100 for s in args.seeds]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        delta = (
            statistics.mean(100 * (by_seed[s][0] - base[s][0]) for s in args.seeds)
            if base
            else float("nan")
        )
        per_seed = ", ".join(f"{a:.2f}" for a in accs)
        seconds = statistics.mean(by_seed[s][1] for s in args.seeds)
        lines.append(
            f"| {method} | {per_seed} | {statistics.mean(accs):.2f} ± {sd:.2f} | "
            f"{delta:+.2f} | {seconds:.0f} |"
        )
    write_section(args.section, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
