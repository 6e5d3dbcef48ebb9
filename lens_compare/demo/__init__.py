"""The offline demo: the fine-tune lens_compare builds of SmolLM2, and its task."""
