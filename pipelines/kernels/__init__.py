"""Triton kernels of the pipelines' device stages (imported only where Triton is used)."""
