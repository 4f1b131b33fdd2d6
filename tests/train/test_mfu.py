import pytest

from lnfm.train.mfu import mfu, peak_flops


@pytest.mark.parametrize("kind,peak", [
    ("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989.4e12),
    ("NVIDIA A100-SXM4-80GB", 312e12), ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12),
    ("TPU v5p", 459e12), ("TPU v6 lite", 918e12), ("cpu", None), ("Some New Chip", None)])
def test_peak_table(kind, peak):
    assert peak_flops(kind) == peak


def test_mfu_formula_and_na_on_cpu():
    # 2e12 FLOPs in 0.5 s on 4 A100s: 4e12 FLOP/s out of 4 x 312e12.
    assert mfu(2e12, 0.5, "NVIDIA A100-SXM4-40GB", 4) == pytest.approx(4e12 / (4 * 312e12))
    assert mfu(2e12, 0.5, "cpu", 8) is None
    assert mfu(None, 0.5, "TPU v4", 8) is None


def test_forward_flops_of_a_matmul_and_train_convention():
    import jax
    import jax.numpy as jnp

    from lnfm.train.mfu import forward_flops, train_flops

    a = jax.ShapeDtypeStruct((8, 32), jnp.float32)
    b = jax.ShapeDtypeStruct((32, 16), jnp.float32)
    assert forward_flops(jnp.matmul, a, b) == 2 * 8 * 32 * 16
    assert train_flops(100.0) == 300.0 and train_flops(None) is None
