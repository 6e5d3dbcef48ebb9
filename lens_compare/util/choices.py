"""The small closed sets every layer spells the same way: run dtypes, strategies, export formats.

Torch-free, so the planner and the CLIs can name them without importing a framework.

>>> DTYPES, STRATEGIES
(('float32', 'bfloat16', 'float16'), ('resident', 'sequential', 'nf4', 'stream'))
"""

from typing import Literal, get_args

# The float precisions a model runs in (the planner's precisions add fp8 and nf4 storage).
Dtype = Literal["float32", "bfloat16", "float16"]
DTYPES: tuple[str, ...] = get_args(Dtype)
DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}

# How a pair runs (see the planner); ``auto`` lets the planner pick among them.
Strategy = Literal["resident", "sequential", "nf4", "stream"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
StrategyChoice = Literal["auto", Strategy]

ChatTemplateName = Literal["none", "sft"]
# Whose tokenizer gives the ids both models see (``--tokenizer``).
TokenizerName = Literal["base", "sft"]
ExportFormat = Literal["parquet", "csv"]
