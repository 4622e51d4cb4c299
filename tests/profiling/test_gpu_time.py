"""``dino_fast.profiling.gpu_time``: the shares of a step's GPU time by kernel category and
the attention backend, from profiler events (built here as the profiler gives them on CUDA,
with kernel names as they are on an H100)."""
from types import SimpleNamespace

import pytest
from torch.autograd import DeviceType

from dino_fast.profiling.gpu_time import (
    attention_backends,
    busy_time,
    gpu_time_breakdown,
    kernel_category,
)


def kernel(name, start, end, device=DeviceType.CUDA, annotation=False):
    return SimpleNamespace(name=name, device_type=device, is_user_annotation=annotation,
                           time_range=SimpleNamespace(start=start, end=end))


@pytest.mark.parametrize("name, category", [
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("nvjet_hsh_192x128_64x4_1x2_h_bz_coopA_NTT", "matmul"),
    ("cutlass3x_sm90_tensorop_s64x128x16gemm_bf16_bf16_f32", "matmul"),
    ("triton_tem_fused_mm_0", "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x64", "attention"),
    ("_attn_fwd_kernel", "attention"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>",
     "optimizer"),
    ("_ema_kernel", "optimizer"),
    # inductor names kernels after the ATen ops in them: the copy feeding SDPA is not attention
    ("triton_poi_fused__scaled_dot_product_flash_attention_transpose_3", "other"),
    ("triton_red_fused_native_layer_norm_7", "other"),
    ("_dino_rows_kernel", "other"),
    ("Memcpy DtoD (Device -> Device)", "other"),
])
def test_kernel_categories(name, category):
    assert kernel_category(name) == category


def test_attention_backends_named_by_their_kernels():
    assert attention_backends(["pytorch_flash::flash_bwd_dq_dk_dv_loop_kernel",
                               "pytorch_flash::flash_fwd_kernel", "sm90_xmma_gemm"]) == "flash"
    assert attention_backends(["fmha_cutlassB_bf16", "_attn_fwd_kernel"]) == \
        "efficient+triton (dino_fast)"
    assert attention_backends(["cudnn_generated_fort_native_sdpa_sm90"]) == "cudnn"
    assert attention_backends(["sm90_xmma_gemm", "softmax_warp_forward"]) == "none"


def test_busy_time_counts_overlaps_once():
    assert busy_time([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17
    assert busy_time([]) == 0


def test_breakdown_shares_add_up_with_the_idle_time():
    """A 100 us span: 40 us of gemm, 20 of flash attention, 10 of Adam, 10 of other kernels,
    20 with no kernel; host events and annotations take no share."""
    events = [kernel("sm90_xmma_gemm", 0, 40), kernel("flash_fwd_kernel", 40, 60),
              kernel("triton_poi_fused_add_0", 70, 80),
              kernel("multi_tensor_apply_kernel<FusedAdamMathFunctor>", 90, 100),
              kernel("aten::mm", 0, 100, device=DeviceType.CPU),
              kernel("dino_fast::ema_", 85, 100, annotation=True)]
    shares = gpu_time_breakdown(events)
    assert shares == pytest.approx({"matmul_pct": 40, "attention_pct": 20, "optimizer_pct": 10,
                                    "other_pct": 10, "idle_pct": 20,
                                    "attention_backend": "flash"})


def test_no_gpu_activity_gives_no_breakdown():
    assert gpu_time_breakdown([kernel("aten::mm", 0, 5, device=DeviceType.CPU)]) == {}
