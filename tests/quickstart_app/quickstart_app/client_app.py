"""quickstart-pytorch's ClientApp, unchanged in shape: arrays + metrics in, arrays + metrics out."""

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from quickstart_app.task import Net, load_data
from quickstart_app.task import train as train_fn

app = ClientApp()


@app.train()
def train(msg: Message, context: Context):
    model = Net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loader, _ = load_data(
        context.node_config["partition-id"], context.node_config["num-partitions"]
    )
    loss = train_fn(model, loader, context.run_config["local-epochs"], msg.content["config"]["lr"])
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"train_loss": loss, "num-examples": len(loader.dataset)}),
        }
    )
    return Message(content=content, reply_to=msg)
