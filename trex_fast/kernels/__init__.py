"""Triton kernels and their autograd Functions; import a family's module only when it is needed."""
