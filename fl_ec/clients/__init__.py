"""Flower ClientApps and their local trainers."""
