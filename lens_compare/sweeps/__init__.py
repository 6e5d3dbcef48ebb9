"""Sweeps: many pairs at many token lengths, each a run of its own with its own JSON, planned
before anything loads, indexed and merged into one table (``python -m lens_compare.sweep``,
``lens_compare.sweep(...)``)."""
