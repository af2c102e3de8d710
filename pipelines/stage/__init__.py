"""The device stage: decoded images -> MultiCropBatch (dispatcher, torch spec, draws, image
hand-off, Triton kernels, side-stream overlap)."""
