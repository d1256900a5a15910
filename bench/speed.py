"""Solver speed on single layers of realistic shapes, against SparseGPT and against the matmul limit.

For each shape (in x out) and pattern, every solver runs on the same random layer and Hessian;
the table gives the median time of several runs, the ratio to sparsegpt, the layer error, and the
ratio to the machine's "limit": the time its own measured matmul rate needs for the dense work
every OBS-type solver must do (the inverse factor, a Cholesky factorization and a triangular
inverse of in^3/3 flops each, and one update pass over the weights, 2 * out * in^2 flops).
Hessian accumulation is timed separately, as tokens per second and as a fraction of matmul peak
(2 * tokens * in^2 flops). A profile of where APT's time goes follows.

    python bench/speed.py                 # full run, writes bench/results/speed.md
    python bench/speed.py --quick --out /tmp/speed.md   # small shapes (the CI smoke run)
    python bench/speed.py --real          # also six real SmolLM2 layers (the offline model)
    python bench/speed.py --pipeline      # also the whole 50% prune of SmolLM2, sparsegpt vs apt

The pipeline section prunes the offline SmolLM2-135M (32 x 512 tokens of WikiText-2 valid) with
each method in turn, from the same dense weights, and splits the time into the solver (summed
over layers, by kind of layer), the Hessians' accumulation, the layer errors, and the rest (the
model's forwards, the capture of block 0's inputs, bookkeeping).
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch

import apt_viz.runner as runner
from apt_viz import Sparsity, accumulate_hessian, cpu_matmul, layer_error, sparsify_weight
from apt_viz.hessian import GRAM_ROWS, _inverse_cholesky_, factors_by_halves, inverse_and_factor, mirror_upper_, prepare
from apt_viz.solvers.apt import REFIT_RTOL, select_mask
from apt_viz.solvers.refit import BFLOAT16_MIN_COLS, refit_matmul_dtype, refit_pcg

CPU_SHAPES = [(576, 576), (576, 1536), (1536, 576), (2048, 2048), (2048, 8192)]
GPU_SHAPES = CPU_SHAPES + [(4096, 4096), (4096, 11008)]
QUICK_SHAPES = [(64, 128), (128, 64)]
REAL_LAYERS = [f"model.layers.{b}.{n}" for b in (5, 15) for n in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj")]
# (label, method, solver options): APT with and without its final exact re-fit.
VARIANTS = [("magnitude", "magnitude", {}), ("wanda", "wanda", {}), ("sparsegpt", "sparsegpt", {}),
            ("apt (no re-fit)", "apt", {"final_refit": False}), ("apt", "apt", {})]
# Where APT's default re-fit runs its matmuls in bfloat16, the float32 re-fit is timed beside it.
FLOAT32_REFIT = ("apt (float32 re-fit)", "apt", {"refit_dtype": "float32"})


def variants(device: torch.device) -> list[tuple[str, str, dict]]:
    """The solver variants timed on ``device``."""
    return VARIANTS + ([FLOAT32_REFIT] if refit_matmul_dtype("auto", device) != torch.float32 else [])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def elapsed(fn, device: torch.device) -> float:
    """Wall time of one call of ``fn``, its device work included."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of ``repeats`` calls after one warm-up."""
    fn()
    return statistics.median(elapsed(fn, device) for _ in range(repeats))


def matmul_rates(device: torch.device, n: int) -> dict[str, float]:
    """Measured float32 matmul rates (flop/s) on ``n x n`` operands: torch's ``mm`` and, on CPU,
    oneDNN's (:mod:`apt_viz.cpu_matmul`). The best of them is the peak the limits use."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    rates = {"torch's mm": 2 * n**3 / timed(lambda: a @ b, device, 5)}
    if device.type == "cpu" and cpu_matmul.available():
        rates["oneDNN"] = 2 * n**3 / timed(lambda: cpu_matmul.mm(a, b), device, 5)
    return rates


def layer(cols: int, rows: int, device: torch.device, tokens: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """A random layer with correlated inputs and a few outlier features, as LLM activations have."""
    g = torch.Generator().manual_seed(cols * 7 + rows)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    X = torch.randn(tokens, cols, generator=g) @ mix
    X[:, : max(1, cols // 100)] *= 20
    H = (2 / tokens) * X.T @ X
    W = torch.randn(rows, cols, generator=g) / cols**0.5
    return W.to(device), H.to(device)


def take_turns(runs: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """Median wall time of each of ``runs`` (already warmed up), the runs taking turns, one call
    each per round, so that a drift in the host's speed (on a shared CPU it moves by a quarter
    within minutes) reaches all of them alike."""
    samples: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(repeats):
        for label, fn in runs.items():
            samples[label].append(elapsed(fn, device))
    return {label: statistics.median(ts) for label, ts in samples.items()}


def time_variants(W, H, spec: str, device: torch.device, repeats: int, skip=()) -> dict[str, tuple[float, float]]:
    """Median time and relative error of each solver variant (but ``skip``'s methods) on one
    layer, the variants taking turns after a warm-up round (which measures the errors)."""
    runs = {label: (lambda m=m, opts=opts: sparsify_weight(W, H, spec, m, **opts)) for label, m, opts in variants(device) if m not in skip}
    errors = {label: layer_error(W, fn().weight, H)[1] for label, fn in runs.items()}
    times = take_turns(runs, device, repeats)
    return {label: (times[label], errors[label]) for label in runs}


def bench_solvers(shapes, specs, device, repeats, peak) -> list[str]:
    lines = ["| in x out | pattern | method | median s | x sparsegpt | x limit | rel. error |", "|---|---|---|---|---|---|---|"]
    for cols, rows in shapes:
        W, H = layer(cols, rows, device)
        limit = (2 * cols**3 / 3 + 2 * rows * cols**2) / peak
        for spec in specs:
            times = time_variants(W, H, spec, device, repeats)
            for m, (t, err) in times.items():
                lines.append(f"| {cols} x {rows} | {spec} | {m} | {t:.3f} | {t / times['sparsegpt'][0]:.2f} | {t / limit:.1f} | {err:.5f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


def bench_hessian(widths, device, peak, tokens: int = 8192, batch: int = 512) -> list[str]:
    """``accumulate_hessian`` over ``tokens`` in batches of ``batch`` (one calibration window, as
    the runner feeds it: the upper blocks, then one mirror); on CPU beside the same with torch's
    own product (MKL's ``addmm``). The fraction of peak counts the flops of the blocks computed."""
    paths = [("apt_viz", True)] + ([("torch's addmm", False)] if device.type == "cpu" and cpu_matmul.available() else [])
    lines = ["| in | tokens | path | median s | tokens/s | fraction of matmul peak |", "|---|---|---|---|---|---|"]
    for cols in widths:
        X = torch.randn(tokens // batch, batch, cols, device=device)

        def accumulate() -> None:
            H, n = None, 0
            for x in X:
                H, n = accumulate_hessian(H, n, x, upper=True)
            mirror_upper_(H)

        for name, on in paths:
            cpu_matmul.enabled = on
            try:
                t = timed(accumulate, device, 5)
            finally:
                cpu_matmul.enabled = True
            frac = 2 * tokens * sum(min(GRAM_ROWS, cols - i) * (cols - i) for i in range(0, cols, GRAM_ROWS)) / t / peak
            lines.append(f"| {cols} | {tokens} | {name} | {t:.4f} | {tokens / t:,.0f} | {frac:.0%} |")
    return lines


def bench_factor(widths, device: torch.device, repeats: int, peak: float) -> list[str]:
    """The inverse factor's two paths, taking turns on each width's damped Hessian: the library's
    Cholesky factorization then a triangular inverse by halves (what GPUs run), and both in one
    recursion by halves (what CPUs run)."""
    lines = ["| in | path | median ms | GFLOP/s | x library | fraction of matmul peak |", "|---|---|---|---|---|---|"]
    info = torch.zeros((), dtype=torch.int32, device=device)
    for cols in widths:
        W, H = layer(cols, 1, device)
        _, H, _ = prepare(W, H, 0.01)
        paths = {f"{name}{' (used here)' if by_halves == factors_by_halves(device) else ''}":
                 (lambda b=by_halves: _inverse_cholesky_(H.flip(0, 1), info, by_halves=b))
                 for name, by_halves in (("library", False), ("by halves", True))}
        for fn in paths.values():
            fn()
        times = take_turns(paths, device, repeats)
        base = next(iter(times.values()))
        flops = 2 * cols**3 / 3
        for name, t in times.items():
            lines.append(f"| {cols} | {name} | {t * 1e3:.2f} | {flops / t / 1e9:.0f} | {t / base:.2f} | {flops / t / peak:.0%} |")
    return lines


def profile_apt(cols: int, rows: int, spec: str, device: torch.device) -> list[str]:
    """Where APT's time goes on one layer: preparation and inverse, mask selection, PCG re-fit."""
    W0, H0 = layer(cols, rows, device)
    s = Sparsity.parse(spec)
    sync(device)
    t0 = time.perf_counter()
    W, H, _ = prepare(W0, H0, 0.01)
    Hinv, U, extra = inverse_and_factor(H)
    H.diagonal().add_(extra)
    sync(device)
    t1 = time.perf_counter()
    pruned, _, _ = select_mask(W, U, s, 128)
    sync(device)
    t2 = time.perf_counter()
    dtype = refit_matmul_dtype("auto", device, cols)
    fit = refit_pcg(W, H, ~pruned, Hinv, error_rtol=REFIT_RTOL, matmul_dtype=dtype)
    sync(device)
    t3 = time.perf_counter()
    total = t3 - t0
    return [
        f"APT on {cols} x {rows}, {spec}: {total:.2f} s",
        "",
        "| stage | s | share |",
        "|---|---|---|",
        f"| damping + inverse factor | {t1 - t0:.3f} | {(t1 - t0) / total:.0%} |",
        f"| mask selection (block-joint OBS) | {t2 - t1:.3f} | {(t2 - t1) / total:.0%} |",
        f"| exact re-fit (PCG, {fit.iters} iterations, {fit.iters - fit.float32_iters} of them in"
        f" {str(dtype).removeprefix('torch.')}) | {t3 - t2:.3f} | {(t3 - t2) / total:.0%} |",
    ]


def layer_hessians(model: torch.nn.Module, calib: torch.Tensor, names: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Hessians of the named Llama-style layers (``model.layers.<i>.*``) from the dense model."""
    from apt_viz.capture import Stop

    mods = {n: model.get_submodule(n) for n in names}
    hess: dict[str, tuple[torch.Tensor | None, int]] = {n: (None, 0) for n in names}

    def record(name: str):
        def hook(mod, inp, out) -> None:
            hess[name] = accumulate_hessian(*hess[name], inp[0])
        return hook

    def stop(mod, inp, out) -> None:
        raise Stop

    # The forward ends after the deepest block that holds a wanted layer.
    last = max(int(n.split(".")[2]) for n in names)
    handles = [m.register_forward_hook(record(n)) for n, m in mods.items()]
    handles.append(model.get_submodule(f"model.layers.{last}").register_forward_hook(stop))
    try:
        with torch.no_grad():
            for window in calib:
                try:
                    model(window[None].to(device))
                except Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
    return {n: hess[n][0] for n in names}


def smollm2_calibration(device: torch.device, nsamples: int, seqlen: int, section: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """The offline SmolLM2-135M and ``nsamples x seqlen`` tokens of WikiText-2 valid to calibrate it."""
    from apt_viz.data import shared_data_path
    from apt_viz.models import load_model
    from apt_viz.pipeline import calibration_ids

    calib_path = shared_data_path("wikitext-2/valid.txt")
    if calib_path is None:
        raise SystemExit(f"../shared/data/wikitext-2/valid.txt is missing: the {section} section calibrates on it")
    model, tok = load_model("smollm2-135m", device=device)
    return model, calibration_ids(tok, calib_path, nsamples, seqlen, 0)


def real_layers(device: torch.device, names=REAL_LAYERS, nsamples: int = 16, seqlen: int = 512) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Weights and Hessians of some SmolLM2 layers, from the dense model on WikiText-2 valid."""
    model, calib = smollm2_calibration(device, nsamples, seqlen, "real-layer")
    hess = layer_hessians(model, calib, names, device)
    return [(n, model.get_submodule(n).weight.detach().to(torch.float32).clone(), hess[n]) for n in names]


def bench_real(device: torch.device, repeats: int) -> list[str]:
    """SparseGPT against APT on real SmolLM2 layers, whose Hessians the re-fit finds easier."""
    lines = ["| layer | in x out | pattern | method | median s | x sparsegpt | rel. error |", "|---|---|---|---|---|---|---|"]
    for name, W, H in real_layers(device):
        W, H = W.to(device), H.to(device)
        for spec in ["0.5", "2:4"]:
            times = time_variants(W, H, spec, device, repeats, skip=("magnitude", "wanda"))
            short = name.removeprefix("model.layers.")
            for m, (t, err) in times.items():
                lines.append(f"| {short} | {W.shape[1]} x {W.shape[0]} | {spec} | {m} | {t:.3f} | {t / times['sparsegpt'][0]:.2f} | {err:.5f} |")
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


@contextlib.contextmanager
def calls_timed(module: Any, name: str, device: torch.device) -> Iterator[list[float]]:
    """Replace ``module.name`` by a wrapper that adds each call's seconds to the yielded ``[total]``."""
    own = getattr(module, name)
    total = [0.0]

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        sync(device)
        t0 = time.perf_counter()
        try:
            return own(*args, **kwargs)
        finally:
            sync(device)
            total[0] += time.perf_counter() - t0

    setattr(module, name, wrapper)
    try:
        yield total
    finally:
        setattr(module, name, own)


# Plan settings of the whole-prune runs; the first is the baseline.
PIPELINE_RUNS = [{"method": "sparsegpt"}, {"method": "apt"}, {"method": "apt", "refit": False}]


def bench_pipeline(device: torch.device, runs=PIPELINE_RUNS, nsamples: int = 32, seqlen: int = 512) -> list[str]:
    """Whole prune of the offline SmolLM2 at 50% per method, and where its time goes."""
    from apt_viz import Pruner, PruningPlan

    model, calib = smollm2_calibration(device, nsamples, seqlen, "pipeline")
    lines = [f"SmolLM2-135M, 50% unstructured, {nsamples} x {seqlen} calibration tokens, device {device}. "
             "Besides the solvers: the Hessians' accumulation, each layer's error check, and the rest "
             "(the model's forwards, the capture of block 0's inputs, the bookkeeping).", "",
             "| method | whole prune s | x sparsegpt | solver s | Hessians s | layer errors s | forwards and the rest s "
             "| solver s by layer kind |",
             "|---|---|---|---|---|---|---|---|"]
    base = None
    for settings in runs:
        plan = PruningPlan(sparsity=0.5, **settings)
        pruner = Pruner(model, device=device)
        sync(device)
        with calls_timed(runner, "accumulate_hessian", device) as hess, calls_timed(runner, "mirror_upper_", device) as mirror, \
                calls_timed(runner, "layer_error", device) as errs:
            t0 = time.perf_counter()
            # A copy: restore() empties the pruner's own results.
            results = dict(pruner.run(calib, plan, progress=False))
            sync(device)
            total = time.perf_counter() - t0
        pruner.restore()
        base = base or total
        solve = sum(r.seconds for r in results.values())
        kinds: dict[str, float] = {}
        for r in results.values():
            kinds[r.kind] = kinds.get(r.kind, 0.0) + r.seconds
        split = ", ".join(f"{k} {v:.0f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
        rest = total - solve - hess[0] - mirror[0] - errs[0]
        lines.append(f"| {plan.method_label} | {total:.0f} | {total / base:.2f} | {solve:.0f} | {hess[0] + mirror[0]:.0f} | {errs[0]:.0f} "
                     f"| {rest:.0f} | {split} |")
        print(lines[-1], file=sys.stderr, flush=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes only (a smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shapes", nargs="*", default=None, help="in x out pairs such as 576x1536 (default: all for the device)")
    p.add_argument("--pipeline", action="store_true", help="also time the whole 50%% prune of SmolLM2 (minutes)")
    p.add_argument("--real", action="store_true", help="also time real SmolLM2 layers (the offline model)")
    p.add_argument("--pipeline-only", action="store_true", help="time only the whole prune, not single layers")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "speed.md"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    shapes = QUICK_SHAPES if args.quick else (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    if args.shapes:
        shapes = [tuple(int(v) for v in sh.lower().split("x")) for sh in args.shapes]
    peak_n = 512 if args.quick else 2048
    rates = matmul_rates(device, peak_n)
    peak = max(rates.values())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    out = [
        "# Solver speed",
        "",
        f"Machine: {platform.platform()}, {name}, torch {torch.__version__}, device {device}.",
        f"Command: `python bench/speed.py {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip() + "",
        f"Measured float32 matmul peak: {peak / 1e9:.1f} GFLOP/s, the best of "
        + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in rates.items())
        + f" ({peak_n} x {peak_n} operands). Median of {args.repeats} runs after a warm-up;"
        " on each layer the solvers take turns, one run each per round.",
        "Limit = (2/3 in^3 + 2 out in^2) flops at that peak: the inverse factor plus one update pass.",
        f"APT's re-fit runs its matmuls in {str(refit_matmul_dtype('auto', device)).removeprefix('torch.')}"
        f" on this device for layers of {BFLOAT16_MIN_COLS} input columns or more, else in float32"
        " (`refit_dtype='auto'`); its certified stop is checked on float32 multipliers and residual"
        " (the small gap term measured in bfloat16).",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def emit(*lines: str) -> None:
        """Add a finished section and rewrite the file: a run cut short (a GPU lent for minutes) keeps it."""
        out.extend(lines)
        Path(args.out).write_text("\n".join(out))

    emit()
    if not args.pipeline_only:
        emit("## Solvers", "", *bench_solvers(shapes, ["0.5", "2:4"], device, args.repeats, peak), "")
        emit("## Hessian accumulation", "", *bench_hessian(sorted({c for c, _ in shapes}), device, peak), "")
        emit(
            "## Inverse factor",
            "",
            "The Cholesky factor of `H^-1` that SparseGPT and APT start from (`2/3 in^3` flops), by the two paths",
            "of `apt_viz.hessian`; the solvers take the one marked as used here.",
            "",
            *bench_factor(sorted({c for c, _ in shapes}), device, max(args.repeats, 5), peak),
            "",
        )
        emit("## Where APT's time goes", "", *profile_apt(*shapes[-1], "0.5", device), "")
    if args.real and not args.pipeline_only:
        emit("## Real SmolLM2 layers", "",
             "Weights and Hessians of six layers of the offline SmolLM2-135M, from the dense model on",
             "16 x 512 tokens of WikiText-2 valid.", "", *bench_real(device, args.repeats), "")
    if args.pipeline or args.pipeline_only:
        emit("## Whole prune: sparsegpt against apt", "", *bench_pipeline(device), "")
    print("\n".join(out))


if __name__ == "__main__":
    main()
