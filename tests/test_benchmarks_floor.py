"""benchmarks/floor.py: the convolutions it records and the FLOPs it gives them (the floors in the README
rest on both) against hand-computed counts and torch's own FLOP counter."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the benchmarks package lives at the root

from benchmarks.floor import conv_flops, count, kind_of  # noqa: E402


def test_recorded_convolutions_have_the_hand_computed_flops():
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    w = torch.randn(4, 8, 3, 3, requires_grad=True)
    wt = torch.randn(8, 5, 4, 4)  # transposed: (in, out, k, k), no gradient wanted

    def step():
        y = F.conv2d(x, w, padding=1, stride=2)  # 8x8 outputs
        z = F.conv_transpose2d(x, wt, stride=2)
        (y.sum() + z.sum()).backward()

    counted = count(step)
    by_op = {}
    for call, n in counted.convs.items():
        by_op.setdefault((call.op, call.shapes[-1]), []).append(conv_flops(call) * n)
    conv = 2 * 2 * 4 * 8 * 9 * 8 * 8  # 2 * N * O * I * k^2 * outputs
    transposed = 2 * 2 * 8 * 5 * 16 * 16 * 16  # every input pixel meets the whole 4x4x5 kernel
    assert by_op[("forward", (4, 8, 3, 3))] == [conv]
    assert by_op[("forward", (8, 5, 4, 4))] == [transposed]
    assert by_op[("backward", (4, 8, 3, 3))] == [2 * conv]  # input and weight gradients
    assert by_op[("backward", (8, 5, 4, 4))] == [transposed]  # input gradient only
    assert counted.flops == 3 * conv + 2 * transposed  # torch.utils.flop_counter agrees


def test_inference_mode_convolutions_are_recorded_too():
    # Under inference_mode conv2d reaches the dispatcher undecomposed; the counter decomposes it.
    x, w = torch.randn(1, 3, 10, 10), torch.randn(6, 3, 3, 3)
    with torch.inference_mode():
        counted = count(lambda: F.conv2d(x, w, padding=1))
    assert sum(conv_flops(c) * n for c, n in counted.convs.items()) == counted.flops == 2 * 6 * 3 * 9 * 100


def test_kernel_kinds():
    assert kind_of("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "cuDNN convolutions"
    assert kind_of("nchwToNhwcKernel") == "layout transposes"
    assert kind_of("nvjet_tst_128x64_64x8_1x2_h_bz_coopA_TNT") == "cuBLAS products"
    assert kind_of("triton_poi_fused_add_mul_0") == "Inductor fused"
    assert kind_of("_deform_kernel") == "project Triton (deformation, tri-plane)"
    assert kind_of("void at::native::vectorized_elementwise_kernel<4>") .startswith("other")


def test_upconv_estimates_scale_only_the_transposed_3x3_stride_2_convs():
    from benchmarks.floor import upconv_estimates

    x = torch.randn(1, 4, 6, 6, requires_grad=True)
    up, plain = torch.randn(4, 5, 3, 3), torch.randn(5, 4, 3, 3)

    def step():
        y = F.conv_transpose2d(x, up, stride=2)  # the reference path's up-sampling conv
        F.conv2d(x, plain, padding=1).sum().add(y.sum()).backward()

    counted = count(step)
    up_flops = 2 * 4 * 5 * 9 * 36 * 2 / 1e9  # forward + input gradient
    est = upconv_estimates(counted, 1, cuda=False)
    assert abs(est["reference_upconv_gflop_per_image"] - up_flops) < 1e-15
    assert abs(est["fast_path_fold_gflop_per_image"] - (counted.flops / 1e9 + 3 * up_flops)) < 1e-15
