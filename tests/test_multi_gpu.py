"""Kernels launched for tensors on a GPU other than the current one (`sparvar generate --device cuda:1`).

Triton launches on the current CUDA device, not on its arguments': every launch wrapper enters its tensors' device
first (sparvar.kernels.csla.launch_device). Without that, a cuda:1 tensor launched from cuda:0 faults or races."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

triton = pytest.importorskip("triton")


@pytest.fixture
def second_gpu():
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs; this machine has {torch.cuda.device_count()}")
    assert torch.cuda.current_device() == 0
    return torch.device("cuda:1")


def test_decoder_and_pointwise_kernels_run_on_their_tensors_gpu(second_gpu):
    from sparvar.fp8 import quantize_rows_ref
    from sparvar.hart.model import swiglu as swiglu_reference
    from sparvar.kernels.decoder_glue import (residual_add, residual_add_reference, upsample_nearest_2x,
                                              upsample_nearest_2x_reference)
    from sparvar.kernels.fp8 import quantize_rows_triton
    from sparvar.kernels.group_norm import group_norm
    from sparvar.kernels.pointwise import swiglu

    dev = second_gpu
    x = torch.randn(1, 64, 32, 32, device=dev).contiguous(memory_format=torch.channels_last)
    h = torch.randn_like(x)
    weight, bias = torch.rand(64, device=dev) + 0.5, torch.randn(64, device=dev)
    got = group_norm(x, weight, bias, 32)
    torch.testing.assert_close(got, F.group_norm(x, 32, weight, bias), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(residual_add(x, h, bias), residual_add_reference(x, h, bias))
    torch.testing.assert_close(upsample_nearest_2x(x), upsample_nearest_2x_reference(x))
    gate, up = torch.randn(3, 100, device=dev, dtype=torch.bfloat16), torch.randn(3, 100, device=dev, dtype=torch.bfloat16)
    torch.testing.assert_close(swiglu(gate, up), swiglu_reference(gate, up))
    rows = torch.randn(4, 256, device=dev, dtype=torch.bfloat16)
    (q, scale), (q_ref, scale_ref) = quantize_rows_triton(rows), quantize_rows_ref(rows)
    assert torch.equal(scale, scale_ref)
    assert (q.float() == q_ref.float()).float().mean() > 0.99  # the same round-to-nearest, up to division rounding
    torch.cuda.synchronize(dev)  # a launch on the wrong GPU would surface here as an illegal memory access
    assert torch.cuda.current_device() == 0  # the wrappers left the current device as it was
