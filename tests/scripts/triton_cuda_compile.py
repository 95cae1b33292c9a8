"""Compiles DNA's Triton kernels for a CUDA GPU (Hopper, sm_90) on any host.

Run without `TRITON_INTERPRET` (under it the kernels are the interpreter's
functions, which do not compile). Compiling runs Triton's whole pipeline
down to the GPU's binary (ptxas included) and refuses what only the
interpreter accepts; running needs the GPU. Prints one line per kernel and
variant: its name, the flags, and the size of its binary.
"""

import inspect

import triton
from triton.backends.compiler import GPUTarget

from keras_dna.ops import triton_kernels

TARGET = GPUTarget("cuda", 90, 32)


def _signature(kernel, constants):
    """Pointer arguments as float32 (the mask int8), scalars as int32 (the
    scale float32), and `constants` as constexprs."""
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {}
    for name in names:
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*i8" if name == "mask_ptr" else "*fp32"
        else:
            signature[name] = "fp32" if name == "scale" else "i32"
    return signature, {(names.index(name),): value for name, value in constants.items()}


def main():
    blocks = dict(BLOCK_Q=64, BLOCK_K=64, BLOCK_H=64)
    variants = [dict(CAUSAL=True, CAUSAL_MASK=True), dict(CAUSAL=False, CAUSAL_MASK=False)]
    for flags in variants:
        kernels = [
            (triton_kernels._prefix_kernel, dict(HAS_MASK=True, HAS_NULL=True)),
            (triton_kernels._forward_kernel, dict(NORMALIZE=True, HAS_MASK=True, BLOCK_HV=64)),
            (triton_kernels._key_gradient_kernel, dict(NORMALIZE=True, HAS_MASK=True, BLOCK_HV=64)),
            (triton_kernels._query_gradient_kernel, dict(NORMALIZE=True, HAS_MASK=True, BLOCK_HV=64)),
        ]
        for kernel, extra in kernels:
            constants = {**blocks, **flags, **extra}
            signature, constexprs = _signature(kernel, constants)
            compiled = triton.compile(
                triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                target=TARGET,
            )
            print(kernel.fn.__name__, flags["CAUSAL"], len(compiled.asm["cubin"]))


if __name__ == "__main__":
    main()
