"""Flower ClientApps and their local trainers, and the helpers that let any ClientApp
train FedHCE's variants (:func:`receive_variant`, :func:`reply_variant`)."""

from fl_ec.clients.variants import receive_variant, reply_variant

__all__ = ["receive_variant", "reply_variant"]
