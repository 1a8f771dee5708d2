"""quickstart-pytorch's task.py on Fashion-MNIST, read from local files.

The model, the loaders (flwr-datasets partitioner, dict batches) and the train/test loops
are Flower's example's, for 1-channel 28x28 images. Only where the data comes from
differs: the example downloads it from a hub, tests read the Debian package's files.
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from datasets import Array2D, Dataset, Features, Value
from flwr_datasets.partitioner import IidPartitioner
from torch.utils.data import DataLoader

from fl_ec.data.sources import load_fashion_mnist


class Net(nn.Module):
    """Model (simple CNN adapted from 'PyTorch: A 60 Minute Blitz')"""

    def __init__(self):
        super(Net, self).__init__()  # noqa: UP008 (as in the example)
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 4 * 4)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


partitioner = None  # Cache the partitioner


def fashion_mnist(split: str) -> Dataset:
    """Fashion-MNIST's split as a Hugging Face dataset (the example's hub dataset)."""
    train, test = load_fashion_mnist()
    data = train if split == "train" else test
    features = Features({"img": Array2D((28, 28), "uint8"), "label": Value("int64")})
    return Dataset.from_dict(
        {"img": data.images[:, 0].numpy(), "label": data.labels.numpy()}, features=features
    )


def apply_transforms(batch):
    """ToTensor + Normalize((0.5,), (0.5,)) on each image, as the example's transforms."""
    batch["img"] = [
        (torch.as_tensor(np.asarray(img, dtype=np.float32)).unsqueeze(0) / 255 - 0.5) / 0.5
        for img in batch["img"]
    ]
    return batch


def load_data(partition_id: int, num_partitions: int, batch_size: int):
    """Load partition Fashion-MNIST data."""
    # Only initialize the partitioner once
    global partitioner
    if partitioner is None:
        partitioner = IidPartitioner(num_partitions=num_partitions)
        partitioner.dataset = fashion_mnist("train")
    partition = partitioner.load_partition(partition_id)
    # Divide data on each node: 80% train, 20% test
    partition_train_test = partition.train_test_split(test_size=0.2, seed=42)
    # Construct dataloaders
    partition_train_test = partition_train_test.with_transform(apply_transforms)
    trainloader = DataLoader(partition_train_test["train"], batch_size=batch_size, shuffle=True)
    testloader = DataLoader(partition_train_test["test"], batch_size=batch_size)
    return trainloader, testloader


def load_centralized_dataset():
    """Load test set and return dataloader."""
    test_dataset = fashion_mnist("test").with_transform(apply_transforms)
    return DataLoader(test_dataset, batch_size=128)


def train(net, trainloader, epochs, lr, device):
    """Train the model on the training set."""
    net.to(device)  # move model to GPU if available
    criterion = torch.nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for batch in trainloader:
            images = batch["img"].to(device)
            labels = batch["label"].to(device)
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    avg_trainloss = running_loss / (epochs * len(trainloader))
    return avg_trainloss


def test(net, testloader, device):
    """Validate the model on the test set."""
    net.to(device)
    criterion = torch.nn.CrossEntropyLoss()
    correct, loss = 0, 0.0
    with torch.no_grad():
        for batch in testloader:
            images = batch["img"].to(device)
            labels = batch["label"].to(device)
            outputs = net(images)
            loss += criterion(outputs, labels).item()
            correct += (torch.max(outputs.data, 1)[1] == labels).sum().item()
    accuracy = correct / len(testloader.dataset)
    loss = loss / len(testloader)
    return loss, accuracy
