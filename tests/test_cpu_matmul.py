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


def _count_onednn_linears(monkeypatch) -> list[tuple]:
    calls: list[tuple] = []
    real = cpu_matmul._onednn_linear

    def counted(x, w, b):
        calls.append(tuple(x.shape))
        return real(x, w, b)

    monkeypatch.setattr(cpu_matmul, "_onednn_linear", counted)
    return calls


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "mamba"])
def test_fast_linears_give_torchs_logits_and_put_the_forwards_back(arch, monkeypatch):
    from conftest import tiny_model

    model = tiny_model(arch)
    # The tiny models' products are far below the size where oneDNN pays; force it for all.
    monkeypatch.setattr(cpu_matmul, "MIN_MACS", 0)
    assert cpu_matmul.available()
    calls = _count_onednn_linears(monkeypatch)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    layers = [m for m in model.modules() if cpu_matmul._linear_layout(m) is not None]
    assert layers, f"{arch} should have linear layers to route"
    ran: list[torch.nn.Module] = []
    for m in layers:
        m.register_forward_hook(lambda mod, inp, out: ran.append(mod))
    with torch.no_grad():
        want = model(ids).logits
        ran.clear()
        with cpu_matmul.fast_linears(model):
            assert all("forward" in vars(m) for m in layers)
            got = model(ids).logits
    # Every linear layer that ran went through oneDNN (Mamba uses some weights directly).
    assert ran and len(calls) == len(ran)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not any("forward" in vars(m) for m in layers)


def test_fast_linears_leave_grad_small_and_hooked_calls_to_torch(monkeypatch):
    from conftest import tiny_model

    model = tiny_model("llama")
    assert cpu_matmul.available()
    calls = _count_onednn_linears(monkeypatch)
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(1))
    with cpu_matmul.fast_linears(model):
        # Products below MIN_MACS (all of this tiny model's) stay torch's.
        with torch.no_grad():
            model(ids)
        assert calls == []
        monkeypatch.setattr(cpu_matmul, "MIN_MACS", 0)
        # A forward that needs gradients stays torch's, and its backward works.
        model(ids).logits.sum().backward()
        assert calls == [] and model.lm_head.weight.grad is not None
    # A forward replaced by someone else (accelerate's hooks do so) is left alone, and kept on exit.
    q = model.model.layers[0].self_attn.q_proj
    own = q.forward
    q.forward = lambda x: own(x)
    hooked = q.forward
    with torch.no_grad(), cpu_matmul.fast_linears(model):
        model(ids)
    assert len(calls) == sum(1 for m in model.modules() if isinstance(m, torch.nn.Linear)) - 1
    assert q.forward is hooked
    # A strided weight (a view into a larger tensor) stays torch's.
    lin = torch.nn.Linear(64, 32, bias=False)
    lin.weight = torch.nn.Parameter(torch.randn(64, 64)[:, :32].t(), requires_grad=False)
    x = torch.randn(4, 64)
    n = len(calls)
    with torch.no_grad(), cpu_matmul.fast_linears(lin):
        torch.testing.assert_close(lin(x), x @ lin.weight.t())
    assert len(calls) == n
    # Nothing is routed when the module is switched off, and an error inside still restores.
    monkeypatch.setattr(cpu_matmul, "enabled", False)
    with torch.no_grad(), cpu_matmul.fast_linears(model):
        assert "forward" not in vars(model.lm_head)
    monkeypatch.setattr(cpu_matmul, "enabled", True)
    with pytest.raises(RuntimeError, match="inside"):
        with cpu_matmul.fast_linears(model):
            raise RuntimeError("inside")
    assert "forward" not in vars(model.lm_head)


def test_pruning_perplexity_and_generation_run_their_forwards_through_onednn(monkeypatch, calib):
    from conftest import tiny_model, word_llama, word_tokenizer

    from apt_viz import Pruner, PruningPlan
    from apt_viz.data import generate, perplexity

    model = tiny_model("llama")
    dense_ppl = perplexity(model, calib, progress=False)
    monkeypatch.setattr(cpu_matmul, "MIN_MACS", 0)
    assert cpu_matmul.available()
    calls = _count_onednn_linears(monkeypatch)
    assert perplexity(model, calib, progress=False) == pytest.approx(dense_ppl, rel=1e-5)
    n = len(calls)
    assert n >= len(calib) * 15  # 14 block linears and the head per window
    Pruner(model).run(calib, PruningPlan(method="sparsegpt", sparsity=0.5), progress=False)
    assert len(calls) > n
    assert not any("forward" in vars(m) for m in model.modules())
    tok = word_tokenizer(40)
    n = len(calls)
    generate(word_llama(tok), tok, "w1 w2 w3", max_new_tokens=3)
    assert len(calls) > n
