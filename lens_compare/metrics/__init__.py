"""The numbers: per-token residual metrics, per-layer aggregates and their bootstrap intervals;
pure functions of tensors.
"""
