"""quickstart-pytorch's task.py, on synthetic 28x28 data (no hub downloads in tests)."""

import torch
from torch import nn

from fl_ec.data.sources import make_synthetic


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.fc = nn.Linear(8 * 12 * 12, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


def load_data(partition_id: int, num_partitions: int):
    train, test = make_synthetic(num_train=1200, num_test=300, seed=0)
    part = torch.arange(len(train))[partition_id::num_partitions]
    x, y = train.normalize(train.images[part]), train.labels[part]
    return torch.utils.data.DataLoader(
        list(zip(x, y, strict=True)), batch_size=32, shuffle=True
    ), test


def train(net, loader, epochs, lr):
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    total = 0.0
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            optimizer.step()
            total += float(loss)
    return total / max(len(loader) * epochs, 1)
