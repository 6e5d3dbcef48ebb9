"""A few layers of many, spread evenly: the verdict's rows, the steering check's default layers."""


def spread_layers(layers: tuple[int, ...], rows: int = 5) -> tuple[int, ...]:
    """Up to ``rows`` of ``layers`` spread evenly from the first to the last.

    >>> spread_layers(tuple(range(30)))
    (0, 7, 14, 22, 29)
    """
    count = min(rows, len(layers))
    return tuple(sorted({layers[round(i * (len(layers) - 1) / max(count - 1, 1))] for i in range(count)}))
