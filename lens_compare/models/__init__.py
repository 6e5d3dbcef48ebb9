"""Which model and what it is: references, loading, checkpoints, quantization, placement,
fingerprints, the pair registry, tokenization, and the architecture facts (families,
architectures, parameter counts) the planner, streaming, the lens and the bridge share.
"""
