"""Argument checks shared by the functions and the layer."""

NORMALIZATIONS = ("double", "single", "hybrid")


def check_normalization(normalization):
    """Raises unless `normalization` is one of `NORMALIZATIONS`."""
    if not isinstance(normalization, str) or normalization not in NORMALIZATIONS:
        raise ValueError(
            "Argument `normalization` must be one of "
            f"{', '.join(repr(n) for n in NORMALIZATIONS)}. "
            f"Received: normalization={normalization!r}"
        )


def same_static_shape(a, b):
    """Whether two shapes can be equal, unknown (None) dims matching anything."""
    return len(a) == len(b) and all(
        x is None or y is None or x == y for x, y in zip(a, b)
    )


def check_broadcastable(name, shape, target_shape, min_rank=0):
    """Raises unless `shape` broadcasts to `target_shape` (static dims only)."""
    shape = tuple(shape)
    target_shape = tuple(target_shape)
    compatible = min_rank <= len(shape) <= len(target_shape) and all(
        m is None or t is None or m in (1, t)
        for m, t in zip(reversed(shape), reversed(target_shape))
    )
    if not compatible:
        raise ValueError(
            f"Argument `{name}` must be broadcastable to shape {target_shape} "
            f"(rank {min_rank} to {len(target_shape)}). "
            f"Received: {name}.shape={shape}"
        )


def check_chunk_size(chunk_size):
    """Raises unless `chunk_size` is `None` or a positive integer."""
    if chunk_size is not None and (
        not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1
    ):
        raise ValueError(
            "Argument `chunk_size` must be None or a positive integer. "
            f"Received: chunk_size={chunk_size!r}"
        )
