"""Command line: ``apt-viz prune --model smollm2-135m --method apt --sparsity 0.5 --report DIR``."""

from __future__ import annotations

import argparse
import logging
import sys

from .config import METHODS, PruningPlan, Sparsity


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="apt-viz", description="One-shot post-training pruning of causal LMs.")
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("prune", help="prune a model, evaluate it and write a report folder")
    pr.add_argument("--model", default="smollm2-135m", help="built-in name, Hugging Face id or local folder")
    pr.add_argument("--method", default="apt", choices=METHODS)
    pr.add_argument("--sparsity", default="0.5", help="fraction (0.5) or N:M (2:4)")
    pr.add_argument("--pattern", default=None, help="N:M pattern such as 2:4 (overrides --sparsity)")
    pr.add_argument("--layers", nargs="*", default=["*"], help="name globs of layers to prune")
    pr.add_argument("--exclude", nargs="*", default=[], help="name globs of layers to leave dense")
    pr.add_argument("--sequential", action="store_true", help="prune q/k/v, then o, then up/gate, then down")
    pr.add_argument("--calib", required=True, help="wikitext2, ptb, c4 or a local text file")
    pr.add_argument("--eval", default=None, help="corpus or text file for perplexity")
    pr.add_argument("--nsamples", type=int, default=32)
    pr.add_argument("--seqlen", type=int, default=512)
    pr.add_argument("--nwindows", type=int, default=64, help="evaluation windows (0 = all)")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--device", default="cpu")
    pr.add_argument("--dtype", default="float32")
    pr.add_argument("--report", default="reports/latest", help="folder for the report")
    pr.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from .models import load_model
    from .pipeline import run_job, write_report

    spec = Sparsity.parse(args.sparsity, args.pattern)
    plan = PruningPlan(method=args.method, sparsity=spec.fraction, pattern=spec.pattern, include=args.layers,
                       exclude=args.exclude, sequential=args.sequential)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    result, _ = run_job(model, tok, plan, calib=args.calib, evaluate=args.eval, nsamples=args.nsamples,
                        seqlen=args.seqlen, nwindows=args.nwindows or None, seed=args.seed, device=args.device)
    out = write_report(result, args.report, {"model": args.model, "seed": args.seed, "nsamples": args.nsamples, "seqlen": args.seqlen})
    print(f"perplexity dense {result.ppl_dense} -> pruned {result.ppl_pruned}; pruning took {result.prune_seconds:.1f} s")
    print(f"report written to {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
