"""Flower's stock exchange: the baseline of benchmarks/exchange.py."""
