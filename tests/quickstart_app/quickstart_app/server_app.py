"""quickstart-pytorch's ServerApp with FedAvg swapped for FedEC -- nothing else changed.

strategy = FedAvg(fraction_train=fraction_train)                       # before
strategy = FedEC(fraction_train=fraction_train,                        # after
                 model_builder=Net, proxy_data=proxy_images())
"""

import json

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from fl_ec.data.sources import make_synthetic
from fl_ec.distill import DistillSettings
from fl_ec.strategies import FedEC
from quickstart_app.task import Net

app = ServerApp()


def proxy_images():
    # Unlabeled server-side inputs (a different seed from the clients' data).
    proxy, _ = make_synthetic(num_train=300, num_test=1, seed=9)
    return proxy.normalize(proxy.images)


@app.main()
def main(grid: Grid, context: Context) -> None:
    fraction_train: float = context.run_config["fraction-train"]
    num_rounds: int = context.run_config["num-server-rounds"]
    lr: float = context.run_config["lr"]

    global_model = Net()
    arrays = ArrayRecord(global_model.state_dict())

    strategy = FedEC(
        fraction_train=fraction_train,
        model_builder=Net,
        proxy_data=proxy_images(),
        distill=DistillSettings(steps=30, batch_size=32),
    )

    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        train_config=ConfigRecord({"lr": lr}),
        num_rounds=num_rounds,
    )

    state_dict = result.arrays.to_torch_state_dict()
    torch.save(state_dict, context.run_config["results-file"] + ".pt")
    summary = {
        "rounds": sorted(result.train_metrics_clientapp),
        "server-metrics": strategy.server_metrics,
    }
    with open(context.run_config["results-file"] + ".json", "w") as handle:
        json.dump(summary, handle)
