"""Splitting a model over GPUs by whole blocks: device maps computed before any weight is read.

The planner decides that a pair needs N GPUs and lays the models out greedily
(``hardware/layout.py``): modules in order onto GPU 0 until the next does not fit the
GPU's weight budget, then GPU 1, never going back. Here that plan becomes the device
maps ``from_pretrained`` receives:

1. the model is built on the meta device from its config (no weights, a second or so
   even at 80 layers), in the dtype it will load in, with tied weights tied;
2. accelerate's ``infer_auto_device_map`` places it under the planner's per-GPU
   budgets, with the decoder-layer classes unsplittable. A zero-budget ``"mps"``
   entry is added to ``max_memory``: accelerate otherwise holds back room for the
   largest remaining layer on the first GPU (for offload swaps, which lens_compare
   never does), and the map would no longer be the planner's layout;
3. any module the map sends to ``cpu`` or ``disk`` (accelerate's overflow) refuses
   the run, before loading, saying what would fit instead. TransformerBridge would
   refuse such a mixed map too, but only after reading the whole checkpoint.

In ``resident`` the SFT model is placed into what the base model left on each GPU;
in ``sequential`` each model gets the whole budget. NF4 models are laid out by the
same greedy fill over the same modules with their 4-bit sizes (accelerate's size
computation on a meta model knows only whole-byte dtypes), and checked the same way.

The summary of a placement (recorded in the JSON provenance) is, per device, the
decoder blocks it holds and the GiB placed there.
"""

import logging
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch

from lens_compare.errors import HardwareError
from lens_compare.models.architecture import transformers_config
from lens_compare.models.load_options import LoadOptions
from lens_compare.util.dtypes import TORCH_DTYPES
from lens_compare.util.units import GIB

logger = logging.getLogger("lens_compare")

# accelerate keeps no room back on any integer GPU when the "main device" is mps.
_NO_RESERVE_SENTINEL = "mps"
NF4_BLOCK = 64


def meta_model(config: Any, dtype: str) -> torch.nn.Module:
    """The model's skeleton on the meta device, in ``dtype``, with tied weights tied."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(transformers_config(config), dtype=TORCH_DTYPES[dtype])
    # transformers 5 records ties but does not tie in from_config; accelerate only sees
    # ties that are shared Parameter objects (a tied head must sit with the embedding).
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model


def no_split_classes(model: torch.nn.Module) -> list[str]:
    return sorted(getattr(model, "_no_split_modules", None) or [])


def _nf4_bytes(module: torch.nn.Module, skip: set[int]) -> int:
    """Bytes of ``module``'s tensors once bitsandbytes has made its Linear weights NF4."""
    total = 0
    seen: set[int] = set()
    for sub in module.modules():
        for name, tensor in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            if isinstance(sub, torch.nn.Linear) and name == "weight" and id(sub) not in skip:
                n = tensor.numel()
                total += -(-n // 2) + -(-n // NF4_BLOCK) * 4
            else:
                total += tensor.numel() * tensor.element_size()
    return total


def placement_units(model: torch.nn.Module, quantization: str | None = None) -> list[tuple[str, int]]:
    """The modules a device map places, in accelerate's order, with their sizes in bytes.

    A unit is a decoder block (a no-split class) or a module without children,
    walked in registration order as ``infer_auto_device_map`` walks them. A tied
    head shares the embedding's tensor: it follows the embedding at no extra size.
    """
    from accelerate.utils import compute_module_sizes

    no_split = set(no_split_classes(model))
    sizes = compute_module_sizes(model)
    head = model.get_output_embeddings()
    skip = {id(head)} if head is not None else set()
    tied_head = head is not None and head.weight is model.get_input_embeddings().weight
    units: list[tuple[str, int]] = []
    todo = list(model.named_children())
    while todo:
        name, module = todo.pop(0)
        children = list(module.named_children())
        if children and type(module).__name__ not in no_split:
            todo = [(f"{name}.{child}", sub) for child, sub in children] + todo
            continue
        if tied_head and module is head:
            continue
        size = _nf4_bytes(module, skip) if quantization == "nf4" else sizes[name]
        units.append((name, size))
    if tied_head:
        embed = next(name for name, module in model.named_modules() if module is model.get_input_embeddings())
        head_name = next(name for name, module in model.named_modules() if module is head)
        at = [name for name, _ in units].index(embed) + 1
        units.insert(at, (head_name, 0))
    return units


def greedy_map(units: list[tuple[str, int]], budgets: dict[int, int]) -> dict[str, int | str]:
    """The planner's fill of ``units`` into ``budgets``; what fits nowhere goes to ``disk``."""
    gpus = sorted(budgets)
    left = dict(budgets)
    out: dict[str, int | str] = {}
    position = 0
    for name, size in units:
        while position < len(gpus) and size > left[gpus[position]]:
            position += 1
        if position == len(gpus):
            out[name] = "disk"
            continue
        left[gpus[position]] -= size
        out[name] = gpus[position]
    return out


@contextmanager
def _quiet_missing_devices():
    # accelerate logs "Device N is not available" for every budgeted GPU it cannot see
    # (planning a machine from another one, or in tests).
    log = logging.getLogger("accelerate.utils.modeling")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def accelerate_map(model: torch.nn.Module, budgets: dict[int, int]) -> dict[str, int | str]:
    """``infer_auto_device_map`` under ``budgets``, resolved to one entry per placement unit."""
    from accelerate.utils import infer_auto_device_map

    max_memory: dict[int | str, int] = {**{int(g): int(b) for g, b in budgets.items()}, _NO_RESERVE_SENTINEL: 0}
    with _quiet_missing_devices():
        found = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split_classes(model))
    units = [name for name, _ in placement_units(model)]
    return {unit: found[max((k for k in found if k == "" or unit == k or unit.startswith(k + ".")), key=len)]
            for unit in units}


def device_map_for(model: torch.nn.Module, budgets: dict[int, int], quantization: str | None) -> dict[str, int | str]:
    """The device map of ``model`` under per-GPU byte ``budgets`` (may contain ``disk``)."""
    if quantization is None:
        return accelerate_map(model, budgets)
    return greedy_map(placement_units(model, quantization), budgets)


def _used(model: torch.nn.Module, device_map: dict[str, int | str], quantization: str | None) -> dict[Any, int]:
    used: dict[Any, int] = defaultdict(int)
    for name, size in placement_units(model, quantization):
        used[device_map[name]] += size
    return used


def _offloaded(device_map: dict[str, int | str]) -> list[str]:
    return [name for name, device in device_map.items() if not isinstance(device, int)]


def _span(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{names[0]} .. {names[-1]} ({len(names)} modules)"


def split_loads(
    loads: dict[str, LoadOptions],
    chosen,
    configs: dict[str, Any],
    gpus: tuple[int, ...],
    *,
    alternatives: str = "",
) -> dict[str, LoadOptions]:
    """Each side's LoadOptions with its device map and budgets, from the planner's split.

    ``chosen`` is the planner's StrategyResult (its ``splits`` carry the layout and the
    per-GPU weight budget); ``gpus`` are the CUDA indices of the planner's GPUs 0..N-1.
    Raises HardwareError, before any weight is read, when a map would offload anything.
    """
    if not chosen.splits:
        raise HardwareError(f"the planner chose a split over {len(gpus)} GPUs but gave no layout")
    resident = len(chosen.splits) == 1
    layouts = [chosen.splits[0 if resident else index] for index in range(2)]
    models = {role: meta_model(configs[role], loads[role].dtype) for role in ("base", "sft")}
    # The planner's balanced budget first; if the real modules come out larger than it
    # planned, the most each GPU can take.
    for attempt in ("budget", "ceiling"):
        try:
            return _split(loads, models, layouts, resident, gpus, attempt, alternatives)
        except HardwareError:
            if attempt == "ceiling":
                raise
    raise AssertionError("unreachable")


def _split(loads, models, layouts, resident: bool, gpus, attempt: str, alternatives: str) -> dict[str, LoadOptions]:
    out = {}
    left: dict[int, int] | None = None
    for index, role in enumerate(("base", "sft")):
        options = loads[role]
        layout = layouts[index]
        limit = layout.budget if attempt == "budget" else max(layout.ceiling, layout.budget)
        if left is None or not resident:
            left = {gpu: limit for gpu in gpus}
        model = models[role]
        device_map = device_map_for(model, left, options.quantization)
        offloaded = _offloaded(device_map)
        if offloaded:
            raise HardwareError(
                f"refusing to load: the {role} model does not fit the planned split over "
                f"{', '.join(f'cuda:{g}' for g in gpus)} ({limit / GIB:.2f} GiB of weights per GPU): "
                f"{_span(offloaded)} would be offloaded to cpu/disk{alternatives}"
            )
        budgets = dict(left)
        for gpu, size in _used(model, device_map, options.quantization).items():
            left[gpu] -= size
        out[role] = replace(options, device=f"cuda:{gpus[0]}", device_map=device_map, max_memory=budgets)
        logger.info("%s model split: %s", role, summarize_placement(model, device_map, block_names(model)))
    return out


def block_names(model: torch.nn.Module) -> list[str]:
    """Module names of the decoder blocks (the no-split classes), in order."""
    no_split = set(no_split_classes(model))
    return [name for name, module in model.named_modules() if type(module).__name__ in no_split]


def device_label(device: Any) -> str:
    """``0`` -> ``cuda:0``; ``cpu``, ``disk`` and ``cuda:N`` unchanged."""
    return f"cuda:{device}" if isinstance(device, int) else str(device)


def _owner(name: str, device_map: dict[str, Any]) -> Any:
    """The device of module ``name``: the map entry that is ``name`` or its closest ancestor."""
    keys = [k for k in device_map if k == "" or name == k or name.startswith(k + ".")]
    if not keys:
        raise KeyError(f"module {name!r} is not covered by the device map")
    return device_map[max(keys, key=len)]


def summarize_placement(
    model: torch.nn.Module, device_map: dict[str, Any], names_of_blocks: list[str]
) -> dict[str, dict[str, Any]]:
    """``{device: {"blocks": [i, ...], "gib": x}}`` for ``model`` placed by ``device_map``.

    ``names_of_blocks[i]`` is the module name of decoder block ``i``; sizes are taken
    per map entry, so meta (planned or disk-offloaded) tensors count by shape and dtype.
    """
    out: dict[str, dict[str, Any]] = defaultdict(lambda: {"blocks": [], "bytes": 0})
    for index, name in enumerate(names_of_blocks):
        out[device_label(_owner(name, device_map))]["blocks"].append(index)
    seen: set[int] = set()
    for key, device in device_map.items():
        module = model.get_submodule(key) if key else model
        fresh = [t for t in (*module.parameters(), *module.buffers()) if id(t) not in seen]
        seen.update(id(t) for t in fresh)
        out[device_label(device)]["bytes"] += sum(t.numel() * t.element_size() for t in fresh)
    return {
        device: {"blocks": entry["blocks"], "gib": round(entry["bytes"] / GIB, 4)}
        for device, entry in sorted(out.items())
    }


def model_device_map(model: torch.nn.Module) -> dict[str, Any]:
    """The placement a loaded model really has: its ``hf_device_map``, else its one device."""
    found = getattr(model, "hf_device_map", None)
    if found:
        return dict(found)
    return {"": str(next(model.parameters()).device)}
