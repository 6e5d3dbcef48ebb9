"""How models are split over N GPUs by whole modules: the layout a device map will have.

A split places each model's indivisible modules (``params.load_order``: embeddings,
every decoder block, the final norm, the head) in order onto GPU 0 until the next
one does not fit its budget, then GPU 1, and so on, never going back: the greedy
fill accelerate's ``infer_auto_device_map`` performs. Two models (``resident``) are
placed one after the other, the second into what the first left on each GPU.

The weight budget of a GPU is its capacity minus its CUDA context and margin, its
share of the captured residuals and the forward transient (``strategies.py``),
then lowered to the smallest budget the fill still succeeds with, so the models are
spread over every GPU instead of packed onto the first ones.

>>> place([(4, 3, 3), (4, 3, 3)], n_gpus=3, weight_budget=100).per_gpu
(7, 7, 6)
"""

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Layout:
    """Where each model's modules go: ``assignment[m][k]`` is the GPU of model m's module k."""

    budget: int
    assignment: tuple[tuple[int, ...], ...]
    per_gpu: tuple[int, ...]
    # The most a GPU may take (its capacity less the run's other memory): the device
    # map may use up to this when the real modules come out larger than planned.
    ceiling: int = 0

    @property
    def peak(self) -> int:
        return max(self.per_gpu)


def fill(chunks: tuple[int, ...] | list[int], remaining: list[int]) -> list[int] | None:
    """Greedy in-order fill of ``chunks`` into ``remaining`` (mutated); None if one does not fit."""
    gpu, out = 0, []
    for size in chunks:
        while gpu < len(remaining) and size > remaining[gpu]:
            gpu += 1
        if gpu == len(remaining):
            return None
        remaining[gpu] -= size
        out.append(gpu)
    return out


def _fill_all(models_chunks: list[tuple[int, ...]], n_gpus: int, budget: int) -> Layout | None:
    remaining = [budget] * n_gpus
    assignment = []
    for chunks in models_chunks:
        placed = fill(chunks, remaining)
        if placed is None:
            return None
        assignment.append(tuple(placed))
    return Layout(budget, tuple(assignment), tuple(budget - left for left in remaining))


def place(
    models_chunks: list[tuple[int, ...]], n_gpus: int, weight_budget: int, *, balanced: bool = True
) -> Layout | None:
    """Place the models one after the other on ``n_gpus``; None when they do not fit.

    The budget is capped at an even share of all weights plus the largest module: at
    that cap the fill succeeds whenever the cap is within ``weight_budget``, since each
    GPU wastes less than one module. ``balanced`` then searches the smallest budget
    that still fits (a bisection), which spreads the weights as evenly as whole
    modules allow; without it the cap itself is used (enough to decide fit).
    """
    total = sum(sum(chunks) for chunks in models_chunks)
    biggest = max(max(chunks) for chunks in models_chunks)
    even = -(-total // n_gpus)
    cap = min(int(weight_budget), even + biggest)
    layout = _fill_all(models_chunks, n_gpus, cap) if cap >= even else None
    if layout is None:
        return None
    layout = replace(layout, ceiling=int(weight_budget))
    if not balanced:
        return layout
    low, high = even, cap
    while low < high:
        middle = (low + high) // 2
        trial = _fill_all(models_chunks, n_gpus, middle)
        if trial is None:
            low = middle + 1
        else:
            high, layout = middle, replace(trial, ceiling=int(weight_budget))
    return layout
