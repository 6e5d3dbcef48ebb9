"""The torch dtype of each run dtype name (``lens_compare.choices.DTYPES``)."""

import torch

from lens_compare.choices import DTYPES

TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in DTYPES}
