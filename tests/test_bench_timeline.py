"""The GPU-timeline arithmetic of bench/profile_step.py --timeline (CPU: synthetic kernel intervals)."""
import pytest

from bench.profile_step import GAP_SMALL_US, idle_gaps


def test_idle_gaps_splits_launch_gaps_from_host_waits():
    # a: 0-10, b overlaps a (10-15 covered by b), c after a 2 us launch gap, d after a 100 us wait, e nested in d
    kernels = [(0, 10, "a"), (5, 15, "b"), (17, 30, "c"), (130, 200, "d"), (140, 150, "e")]
    r = idle_gaps(kernels)
    assert r["kernels"] == 5
    assert r["busy_ms"] == pytest.approx((15 + 13 + 70) / 1000)
    assert r["idle_ms"] == pytest.approx((2 + 100) / 1000)
    assert r["span_ms"] == pytest.approx(0.2)
    assert (r["small_gaps"], r["small_gaps_ms"]) == (1, pytest.approx(0.002))
    assert (r["large_gaps"], r["large_gaps_ms"]) == (1, pytest.approx(0.1))
    assert r["largest_gaps"] == [{"gap_us": 100.0, "after": "c", "before": "d"}]
    assert r["busy_ms"] + r["idle_ms"] == pytest.approx(r["span_ms"])


def test_idle_gaps_order_and_names():
    # unsorted input; the gap is named after the kernel that ended last before it ("long"), not after the last
    # one to start ("short", nested in it); a gap of exactly GAP_SMALL_US already counts as a wait
    kernels = [(50 + GAP_SMALL_US, 60 + GAP_SMALL_US, "late"), (0, 50, "long"), (10, 20, "short")]
    r = idle_gaps(kernels)
    assert r["small_gaps"] == 0 and r["largest_gaps"] == [{"gap_us": GAP_SMALL_US, "after": "long", "before": "late"}]
    assert r["busy_ms"] == pytest.approx(0.06)
    with pytest.raises(ValueError, match="no kernels"):
        idle_gaps([])


def test_kernel_categories():
    """Attention kernels (cuDNN's SDPA, ours) count as attention; cuDNN's convolutions of the decode, whose names
    also hold "cudnn", as GEMMs (implicit GEMMs), not attention."""
    from bench.profile_step import category

    assert category("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128") == "attention"
    for name in ("_csla_fwd_kernel", "_cs4a_fwd_kernel", "_absorbed_scores_kernel"):
        assert category(name) == "attention", name
    for name in ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_cudnn",
                 "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_bias_TNT"):
        assert category(name) == "gemm", name
    assert category("_residual_norm_kernel") == "other"


def test_kernel_totals_sum_each_kernel_and_category():
    from bench.profile_step import kernel_totals

    kernels = [(0, 300, "_csla_fwd_kernel"), (300, 500, "_csla_fwd_kernel"), (500, 1500, "nvjet_sm90_tst_bias_TNT"),
               (1500, 1550, "_residual_norm_kernel"), (1550, 1650, "_cs4a_fwd_kernel")]
    r = kernel_totals(kernels, top=2)
    assert r["by_category_ms"] == {"attention": pytest.approx(0.6), "gemm": pytest.approx(1.0),
                                   "other": pytest.approx(0.05)}
    assert r["top"] == [{"kernel": "nvjet_sm90_tst_bias_TNT", "ms": 1.0, "launches": 1, "category": "gemm"},
                        {"kernel": "_csla_fwd_kernel", "ms": 0.5, "launches": 2, "category": "attention"}]
