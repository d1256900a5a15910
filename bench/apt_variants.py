"""Layer errors of APT variants against SparseGPT on real SmolLM2-135M layers.

Captures the Hessians of four layer types in blocks 0, 5, 15 and 29 (32 x 512 tokens of WikiText-2
valid, seed 0, dense inputs), then prunes each layer with:
  sgpt        SparseGPT
  sgpt+refit  SparseGPT's mask, re-fitted exactly (what the update alone is worth)
  apt         APT: block-joint OBS mask selection, group-subset N:M, exact re-fit
  admm_row    gradual ADMM mask search (Boza 2024 style, Wanda-normalised, per-row) + exact re-fit
  admm_layer  the same with a per-layer threshold (unstructured only)
Prints relative errors ||WX - W'X||^2 / ||WX||^2.

    python bench/apt_variants.py > bench/results/apt-variants.raw.txt
"""

from __future__ import annotations


import torch

from apt_viz import Pruner, PruningPlan, Sparsity, layer_error, refit, sparsify_weight
from apt_viz.data import calibration_windows, load_text, shared_data_path
from apt_viz.hessian import inverse_factor, prepare
from apt_viz.models import load_model
from apt_viz.solvers.masks import by_score


def admm(W, H, spec, iters=60, per_row=False, rho0=0.1, percdamp=0.01):
    """Gradual-sparsity ADMM on the column-normalised problem, then an exact re-fit of its mask."""
    W, Hd, _ = prepare(W, H, percdamp)
    norm = torch.diag(Hd).sqrt()
    Hn = Hd / norm[:, None] / norm[None, :]
    Wn = W * norm
    rho, Z, U = rho0, Wn.clone(), torch.zeros_like(Wn)
    XW = Wn @ Hn
    eye = torch.eye(len(norm))
    inv = torch.linalg.inv(Hn + rho * eye)
    for it in range(iters):
        frac = min(1.0, (it + 1) / (iters * 0.6))
        Wt = (XW + rho * (Z - U)) @ inv
        V = Wt + U
        step = spec if (spec.structured and frac >= 1) else Sparsity(spec.fraction * (1 - (1 - frac) ** 3))
        pruned = by_score(V.abs(), step, per_row=per_row or spec.structured)
        Z = V.masked_fill(pruned, 0)
        U = U + Wt - Z
        if it % 10 == 9:
            rho *= 1.3
            inv = torch.linalg.inv(Hn + rho * eye)
    Uf, _ = inverse_factor(Hd)
    return refit(W, Hd, ~pruned, Hinv=Uf.t() @ Uf)


def main() -> None:
    model, tok = load_model("smollm2-135m")
    calib = calibration_windows(tok, load_text(shared_data_path("wikitext-2/valid.txt")), 32, 512, 0)
    pruner = Pruner(model)
    pruner.run(calib, PruningPlan(method="magnitude", sparsity=0.0, include=["model.layers.*"]))
    names = [f"model.layers.{b}.{k}" for b in (0, 5, 15, 29) for k in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")]
    for spec_s in ("0.5", "2:4", "0.7"):
        spec = Sparsity.parse(spec_s)
        print("==", spec_s)
        for n in names:
            W, H = pruner.layers[n].weight.data.clone(), pruner.hessians.get(n)
            Wp, Hd, _ = prepare(W, H, 0.01)
            sg = sparsify_weight(W, H, spec, "sparsegpt")
            row = {"sgpt": sg.weight, "sgpt+refit": refit(Wp, Hd, sg.mask)}
            row["apt"] = sparsify_weight(W, H, spec, "apt").weight
            row["admm_row"] = admm(W, H, spec, per_row=True)
            if not spec.structured:
                row["admm_layer"] = admm(W, H, spec)
            print(n.replace("model.layers.", ""), tuple(W.shape), " ".join(f"{k}={layer_error(W, v, H)[1]:.4f}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
