"""Reading the residual stream: hook names, the TransformerBridge capture, the streamed (layer by
layer) capture, norm statistics.
"""
