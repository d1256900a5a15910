"""Command line: ``apt-viz prune ...`` (one plan, one report) and ``apt-viz compare ...`` (a quality table)."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys

from .config import METHODS, REFIT_DTYPES, PruningPlan, Sparsity


def _common(p: argparse.ArgumentParser) -> None:
    """Options both commands share: model, layers, calibration, evaluation."""
    p.add_argument("--model", default="smollm2-135m", help="built-in name, Hugging Face id or local folder")
    p.add_argument("--layers", nargs="*", default=["*"], help="name globs of layers to prune")
    p.add_argument("--exclude", nargs="*", default=[], help="name globs of layers to leave dense")
    p.add_argument("--sequential", action="store_true", help="prune q/k/v, then o, then up/gate, then down")
    p.add_argument("--no-refit", dest="refit", action="store_false",
                   help="APT: skip the exact re-fit of every row on its mask (the paper's algorithm alone: about SparseGPT's speed)")
    p.add_argument("--refit-dtype", choices=REFIT_DTYPES, default="auto",
                   help="APT: the re-fit's matmul dtype (auto: bfloat16 where the device has bfloat16 matmul units; "
                        "float32: the same weights on every machine)")
    p.add_argument("--calib", required=True, help="wikitext2, ptb, c4 or a local text file")
    p.add_argument("--eval", nargs="+", action="extend", default=None, metavar="CORPUS",
                   help="corpora or text files for perplexity (several allowed; --eval may be repeated)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--nwindows", type=int, default=64, help="evaluation windows (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--tasks", nargs="*", default=[], help="zero-shot lm-eval tasks (needs the eval extra and the hub)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code to run")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="apt-viz", description="One-shot post-training pruning of causal LMs.")
    sub = p.add_subparsers(dest="command", required=True)
    pr = sub.add_parser("prune", help="prune a model, evaluate it and write a report folder")
    _common(pr)
    pr.add_argument("--method", default="apt", choices=METHODS)
    pr.add_argument("--sparsity", default="0.5", help="fraction (0.5) or N:M (2:4)")
    pr.add_argument("--pattern", default=None, help="N:M pattern such as 2:4 (overrides --sparsity)")
    pr.add_argument("--report", default="reports/latest", help="folder for the report")
    pr.add_argument("--save", default=None, metavar="DIR",
                    help="also write the pruned model (safetensors), its tokenizer, masks.safetensors and run.json to DIR")
    cp = sub.add_parser("compare", help="several methods and patterns on one calibration set, in one quality table")
    _common(cp)
    cp.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    cp.add_argument("--specs", nargs="+", default=["0.5", "2:4"], help="sparsities and N:M patterns: 0.5 0.7 2:4 4:8")
    cp.add_argument("--report", default="reports/compare", help="folder for quality.md, quality.json and runs/")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "compare":
        return _compare(args, argv)
    return _prune(args)


def _prune(args: argparse.Namespace) -> int:
    from .models import load_model
    from .pipeline import run_job, write_report

    if args.save:
        from .save import check_save_target

        check_save_target(args.save)  # refuse a bad --save folder before the slow part
    spec = Sparsity.parse(args.sparsity, args.pattern)
    plan = PruningPlan(method=args.method, sparsity=spec.fraction, pattern=spec.pattern, include=args.layers,
                       exclude=args.exclude, sequential=args.sequential, refit=args.refit,
                       refit_dtype=args.refit_dtype)
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    result, pruner = run_job(model, tok, plan, calib=args.calib, evaluate=args.eval, nsamples=args.nsamples,
                             seqlen=args.seqlen, nwindows=args.nwindows or None, seed=args.seed, device=args.device,
                             tasks=args.tasks)
    meta = {"model": args.model, "seed": args.seed, "nsamples": args.nsamples, "seqlen": args.seqlen}
    out = write_report(result, args.report, meta)
    for label, ppl in result.perplexity.items():
        print(f"perplexity on {label}: dense {ppl['dense']:.3f} -> pruned {ppl['pruned']:.3f}")
    print(f"pruning took {result.prune_seconds:.1f} s")
    print(f"report written to {out.resolve()}")
    if args.save:
        from .save import save_pruned

        record = {**meta, "calib": args.calib, "eval": args.eval, "nwindows": args.nwindows, "plan": result.plan,
                  "perplexity": result.perplexity, "prune_seconds": result.prune_seconds, "layers": result.layers}
        saved = save_pruned(model, tok, args.save, masks=pruner.masks, record=record)
        print(f"pruned model saved to {saved} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0


def _compare(args: argparse.Namespace, argv: list[str]) -> int:
    from .compare import compare, quality_table, write_quality, write_run_report
    from .models import load_model

    for s in args.specs:
        Sparsity.parse(s)  # fail on a typo before loading anything
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device, trust_remote_code=args.trust_remote_code)
    meta = {"model": args.model, "command": "`apt-viz " + shlex.join(argv) + "`"}
    written: set[int] = set()

    def on_run(partial) -> None:
        for i, run in enumerate(partial.runs):
            if i not in written:
                written.add(i)
                write_run_report(partial, run, args.report, meta)
                ppl = ", ".join(f"{label} {v['pruned']:.2f}" for label, v in run.perplexity.items())
                print(f"{run.method_label} {Sparsity.parse(run.plan['sparsity'], run.plan['pattern'])}: {ppl or 'no eval'}; "
                      f"pruned in {run.prune_seconds:.1f} s", flush=True)
        write_quality(partial, args.report, meta)

    result = compare(model, tok, args.methods, args.specs, calib=args.calib, evaluate=args.eval, nsamples=args.nsamples,
                     seqlen=args.seqlen, nwindows=args.nwindows or None, seed=args.seed, device=args.device,
                     include=args.layers, exclude=args.exclude, sequential=args.sequential, refit=args.refit,
                     refit_dtype=args.refit_dtype, tasks=args.tasks,
                     on_run=on_run)
    print(quality_table(result), end="")
    print(f"shared between runs: {result.shared}")
    print(f"report written to {write_quality(result, args.report, meta).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
