"""Backbones, projector and heads; saving and loading backbone weights."""
