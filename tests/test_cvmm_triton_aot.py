"""Compile the Triton CVMM kernels ahead of time for Hopper (sm_90) with Triton's real backend
and its bundled ptxas -- no GPU needed. The interpreter tests check numerics; this checks that
the kernels are valid for the GPU compiler, which the permissive interpreter does not."""
import pytest

triton = pytest.importorskip("triton")

pytestmark = [pytest.mark.triton, pytest.mark.slow]


def _compile(fn_py, ptrs, consts, arch=90):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = triton.jit(fn_py)
    sig = {n: ("constexpr" if n in consts else ptrs.get(n, "i32")) for n in fn.arg_names}
    return triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=4, num_stages=3))


def test_forward_kernel_compiles_for_sm90_bf16():
    from moeut.kernels import cvmm_triton as ct
    consts = dict(A_GATHER=True, O_SCATTER=True, OUT_ATOMIC=False, HAS_SCALE=True, HAS_DOT=True, DOT_GATHER=True,
                  PADDED=True, BLOCK_E=512, DOT_PREC="tf32", UPCAST=False, BM=64, BN=128, BK=64)
    ptrs = dict(A="*bf16", A_IDX="*i64", W="*fp32", OUT="*bf16", O_IDX="*i64", SCALE="*fp32", DOTX="*bf16",
                DOT_IDX="*i64", DOT_OUT="*fp32", SORTED_E="*i32", OFFSETS="*i32")
    k = _compile(ct._cvmm_fwd_kernel, ptrs, consts)
    assert len(k.asm["cubin"]) > 0 and k.metadata.shared <= 227 * 1024  # fits H100 shared memory


def test_weight_grad_kernel_compiles_for_sm90_bf16():
    from moeut.kernels import cvmm_triton as ct
    consts = dict(X_GATHER=True, G_GATHER=True, HAS_SCALE=True, ATOMIC=False, DOT_PREC="tf32", UPCAST=False,
                  BM=64, BN=64, BK=32)
    ptrs = dict(X="*bf16", X_IDX="*i64", G="*bf16", G_IDX="*i64", SCALE="*fp32", DW="*fp32", OFFSETS="*i32")
    k = _compile(ct._cvmm_dw_kernel, ptrs, consts)
    assert len(k.asm["cubin"]) > 0
