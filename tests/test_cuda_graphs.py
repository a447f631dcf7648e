"""utils.cuda_graphs: replays of a captured function equal direct calls for new input values, one
graph per input signature (shapes, dtypes, autocast) with the oldest evicted, non-finite inputs
named before a replay, and checks that would synchronise skipped only while capturing. The graph
tests need a GPU; the text -> portrait engine's graphed path is checked in test_generate.py."""

from __future__ import annotations

import pytest
import torch

from clipportrait.errors import UserError
from clipportrait.utils.cuda_graphs import GraphCaptureError, GraphedFunction, capturing, check_finite, host_checks

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


def affine(x: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
    product = x @ w
    return {"y": torch.tanh(product) + x.sum(dim=1, keepdim=True), "product": product, "norm": w.norm()}


def test_check_finite_names_every_bad_input():
    good = {"z": torch.zeros(2, 3), "flip": torch.zeros(2, dtype=torch.bool)}
    if torch.cuda.is_available():  # inputs spread over host and device
        good["embedding"] = torch.zeros(2, 4, device="cuda")
    check_finite(good)
    bad = {**good, "camera": torch.tensor([[0.0, float("nan")]]), "pose": torch.tensor([float("inf")])}
    with pytest.raises(UserError, match="camera, pose"):
        check_finite(bad)


def test_outside_a_capture_host_checks_run():
    assert not capturing() and host_checks()


def test_graphed_function_takes_cuda_tensors_only():
    graphed = GraphedFunction(affine)
    with pytest.raises(ValueError, match="CUDA tensors"):
        graphed(torch.zeros(2, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="warmup"):
        GraphedFunction(affine, warmup=0)


@cuda
def test_replays_equal_direct_calls_for_new_values():
    gen = torch.Generator(device="cuda").manual_seed(0)
    graphed = GraphedFunction(affine)
    first = None
    for _ in range(3):  # same shapes: one capture, then replays with the new values
        x, w = (torch.randn(4, 8, device="cuda", generator=gen), torch.randn(8, 8, device="cuda", generator=gen))
        out = graphed(x, w)
        ref = affine(x, w)
        assert torch.allclose(out["y"], ref["y"], atol=1e-6) and torch.allclose(out["norm"], ref["norm"])
        first = out if first is None else first
    assert len(graphed) == 1
    assert not torch.allclose(first["y"], out["y"])  # results are copies: the next replay did not overwrite them


@cuda
def test_one_graph_per_signature_and_the_oldest_goes():
    graphed = GraphedFunction(affine, max_graphs=2)
    w = torch.randn(8, 8, device="cuda")
    captured = []
    for rows in (1, 2, 1):
        graphed(torch.randn(rows, 8, device="cuda"), w)
        captured.append(graphed.last_captured)
    assert len(graphed) == 2 and captured == [True, True, False]
    with torch.autocast("cuda", dtype=torch.bfloat16):  # another autocast state: another graph
        out = graphed(torch.randn(1, 8, device="cuda"), w)
    assert out["product"].dtype == torch.bfloat16 and len(graphed) == 2
    graphed(torch.randn(3, 8, device="cuda"), w)
    assert len(graphed) == 2
    graphed(torch.randn(2, 8, device="cuda"), w)  # evicted by the two above: captured again
    assert graphed.last_captured


@cuda
def test_a_function_that_synchronises_cannot_be_captured():
    def syncs(x: torch.Tensor) -> dict[str, torch.Tensor]:
        if host_checks() and not bool(x.isfinite().all()):  # the pattern the project's checks follow
            raise ValueError("x")
        return {"y": x * float(x.max())}  # reads a device value on the host: not capturable

    with pytest.raises(GraphCaptureError, match="syncs"):  # (the frame is named when it is in the package)
        GraphedFunction(syncs)(torch.ones(3, device="cuda"))
    assert torch.randn(4, device="cuda").isfinite().all()  # the failed capture left random draws working


@cuda
def test_host_inputs_are_staged_and_non_finite_inputs_named():
    """Inputs given on the host go through pinned staging buffers (one graph, replays equal direct calls
    for new values); with check_finite a non-finite host input is named before anything runs and a
    non-finite device input is named from the graph's own check after the replay."""
    graphed = GraphedFunction(affine, device="cuda", check_finite=True)
    w = torch.randn(8, 8, device="cuda")
    outs = []
    for seed in range(3):
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed))  # on the host
        out = graphed(x, w, names=("x", "w"))
        assert torch.allclose(out["y"], affine(x.cuda(), w)["y"], atol=1e-6)
        outs.append(out["y"])
    assert len(graphed) == 1 and not torch.allclose(outs[0], outs[-1])
    bad_x = x.clone()
    bad_x[1, 2] = float("nan")
    with pytest.raises(UserError, match="^non-finite values in x$"):
        graphed(bad_x, w, names=("x", "w"))
    bad_w = w.clone()
    bad_w[0, 0] = float("inf")
    with pytest.raises(UserError, match="^non-finite values in w$"):
        graphed(x, bad_w, names=("x", "w"))
    assert torch.allclose(graphed(x, w, names=("x", "w"))["y"], outs[-1])  # and it goes on


def mixed(x: torch.Tensor, flip: torch.Tensor, idx: torch.Tensor, half: torch.Tensor, w: torch.Tensor):
    picked = torch.where(flip[:, None], -x, x)[:, idx]
    return {"y": picked @ w[: idx.numel()] + half.float().sum()}


@cuda
def test_host_inputs_of_mixed_dtypes_travel_in_one_packed_copy():
    """Host inputs of several dtypes and odd byte sizes (float32, bool, int64, bf16) share one pinned
    buffer and one copy per replay: every replay equals the direct call for new values of each."""
    graphed = GraphedFunction(mixed, device="cuda", check_finite=True)
    w = torch.randn(8, 3, device="cuda")
    results = []
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        inputs = (torch.randn(3, 5, generator=gen), torch.rand(3, generator=gen) > 0.5,
                  torch.randperm(5, generator=gen)[:3], torch.randn(7, generator=gen).bfloat16())
        out = graphed(*inputs, w)["y"]
        assert torch.allclose(out, mixed(*(x.cuda() for x in inputs), w)["y"], atol=1e-6)
        results.append(out)
    assert len(graphed) == 1 and not torch.equal(results[0], results[1])
    bad = inputs[3].clone()
    bad[6] = float("nan")  # bf16 on the host: checked without numpy
    with pytest.raises(UserError, match="input 3"):
        graphed(*inputs[:3], bad, w)
