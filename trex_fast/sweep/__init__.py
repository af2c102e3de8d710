"""Ablation sweeps (`python -m trex_fast.sweep`): points, launchers, report."""
