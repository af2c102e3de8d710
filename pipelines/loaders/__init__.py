"""Loaders: stored images -> decoded images -> the device stage (reference, FFCV, DALI)."""
