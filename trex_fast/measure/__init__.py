"""Measurement, outside the training core: cost counting, phase timers, bottleneck probes."""
