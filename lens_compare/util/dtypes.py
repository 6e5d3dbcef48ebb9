"""The torch dtype of each run dtype name (``lens_compare.util.choices.DTYPES``)."""

import torch

from lens_compare.util.choices import DTYPES

TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPES}
