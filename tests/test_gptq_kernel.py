"""The Triton GPTQ sweep computes what the PyTorch reference computes (GPU only: pytest -m gpu)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("rows, cols", [(640, 128), (1000, 96), (17, 128), (2048, 64), (300, 256)])
def test_triton_sweep_matches_reference(rows: int, cols: int) -> None:
    from compress.solvers.sweep import sweep_torch, sweep_triton

    g = torch.Generator(device="cuda").manual_seed(rows + cols)
    x = torch.randn(4 * cols, cols, device="cuda", generator=g)
    H = x.t() @ x / x.shape[0] + 0.01 * torch.eye(cols, device="cuda")
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    W = torch.randn(rows, cols, device="cuda", generator=g)
    scale = W.abs().amax(dim=1, keepdim=True).expand(rows, cols) / 7.5
    zero = torch.full_like(scale, 8.0)
    q_ref, e_ref = sweep_torch(W, U, scale, zero, 15)
    q, e = sweep_triton(W, U, scale, zero, 15)
    agree = (q == q_ref).float().mean().item()
    assert agree > 0.999, agree  # a rounding tie may flip, and its error then propagates a little
    assert torch.isfinite(e).all()
    assert ((e - e_ref).norm() / e_ref.norm()).item() < 2e-2
