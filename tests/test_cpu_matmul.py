"""Float32 products through oneDNN on CPU: the same products as torch's, to float32 accuracy."""

from __future__ import annotations

import pytest
import torch

from apt_viz import cpu_matmul


def _operands(kind: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    big = torch.randn(700, 600, generator=g)
    if kind == "dense":
        return torch.randn(400, 160, generator=g), torch.randn(160, 200, generator=g)
    if kind == "transposed":
        return torch.randn(160, 400, generator=g).t(), torch.randn(200, 160, generator=g).t()
    # Blocks of a larger matrix, as the solvers' slices are.
    return big[10:410, 30:190], big[300:460, 220:420]


@pytest.mark.parametrize("kind", ["dense", "transposed", "blocks"])
def test_products_equal_torchs_to_float32_accuracy(kind):
    assert cpu_matmul.available(), "oneDNN's float32 product should run on this CPU build of torch"
    a, b = _operands(kind, torch.Generator().manual_seed(0))
    assert a.shape[0] * a.shape[1] * b.shape[1] >= cpu_matmul.MIN_MACS
    want = a.double() @ b.double()
    tol = 2e-6 * float(want.abs().max())
    torch.testing.assert_close(cpu_matmul.mm(a, b).double(), want, rtol=0, atol=tol)
    out = torch.full((a.shape[0], b.shape[1]), float("nan"))
    assert cpu_matmul.mm(a, b, out=out) is out
    torch.testing.assert_close(out.double(), want, rtol=0, atol=tol)
    c0 = torch.randn(a.shape[0], b.shape[1], generator=torch.Generator().manual_seed(1))
    c = c0.clone()
    assert cpu_matmul.addmm_(c, a, b, alpha=-0.5) is c
    torch.testing.assert_close(c.double(), c0.double() - 0.5 * want, rtol=0, atol=tol)


def test_small_or_non_float32_products_and_the_off_switch_use_torch(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_matmul, "_onednn_mm", lambda a, b: calls.append(1) or a @ b)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(400, 160, generator=g), torch.randn(160, 200, generator=g)
    cpu_matmul.mm(a[:8, :8], b[:8, :8])
    cpu_matmul.mm(a.double(), b.double())
    cpu_matmul.mm(a.requires_grad_(), b).sum().backward()
    assert torch.equal(a.grad, torch.ones(400, 200) @ b.t())
    a = a.detach()
    monkeypatch.setattr(cpu_matmul, "enabled", False)
    assert torch.equal(cpu_matmul.mm(a, b), a @ b)
    assert calls == []
    monkeypatch.setattr(cpu_matmul, "enabled", True)
    cpu_matmul.mm(a, b)
    assert calls == [1]
