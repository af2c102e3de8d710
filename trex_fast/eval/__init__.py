"""Evaluation (`python -m trex_fast.eval <command>`): IN1K, k-NN, transfer, probes, export."""
