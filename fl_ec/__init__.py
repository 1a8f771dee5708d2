"""fl-ec: federated learning that aggregates by ensembling and compressing, on Flower."""

__version__ = "0.1.0"
