"""Perplexity of the offline SmolLM2-135M pruned by each method and pattern, in one table.

Protocol: calibrate on 32 x 512 tokens of WikiText-2 `valid` (seed 0), evaluate on the first 64
x 512-token windows of `wiki.test.raw`. Writes bench/results/quality-smollm2.md, a row at a time.

    python bench/quality.py [--methods magnitude wanda sparsegpt apt] [--specs 0.5 2:4 4:8]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

from apt_viz import PruningPlan, Sparsity
from apt_viz.data import eval_windows, load_text, perplexity, shared_data_path, tokenize_text
from apt_viz.models import load_model
from apt_viz.pipeline import run_job

OUT = Path(__file__).parent / "results" / "quality-smollm2.md"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="*", default=["magnitude", "wanda", "sparsegpt", "apt"])
    ap.add_argument("--specs", nargs="*", default=["0.5", "2:4", "4:8"])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--nwindows", type=int, default=64)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    calib = shared_data_path("wikitext-2/valid.txt")
    test = shared_data_path("wikitext-2-raw/wiki.test.raw")
    if calib is None or test is None:
        sys.exit("../shared/data is absent: this benchmark needs WikiText-2 valid and wiki.test.raw")
    out = Path(args.out)
    model, tok = load_model("smollm2-135m")
    windows = eval_windows(tok, tokenize_text(tok, load_text(test)), 512, args.nwindows)
    t0 = time.perf_counter()
    dense = perplexity(model, windows)
    lines = [
        "# Quality: SmolLM2-135M (offline GGUF, float32)", "",
        f"Machine: {platform.platform()}, {torch.get_num_threads()} threads, torch {torch.__version__}, CPU.",
        f"Command: `python bench/quality.py --methods {' '.join(args.methods)} --specs {' '.join(args.specs)}`",
        f"Calibration: {args.nsamples} x 512 tokens of WikiText-2 valid, seed 0. Evaluation: first {args.nwindows} x 512 windows of wiki.test.raw.",
        "", "| method | pattern | wikitext2 ppl | prune time (s) |", "|---|---|---|---|",
        f"| dense | - | {dense:.2f} | - |",
    ]
    out.write_text("\n".join(lines) + "\n")
    print(f"dense {dense:.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    for spec_s in args.specs:
        spec = Sparsity.parse(spec_s)
        for method in args.methods:
            plan = PruningPlan(method=method, sparsity=spec.fraction, pattern=spec.pattern)
            res, pruner = run_job(model, tok, plan, calib=str(calib), evaluate=None, nsamples=args.nsamples, progress=False)
            ppl = perplexity(model, windows, progress=False)
            pruner.restore()
            lines.append(f"| {method} | {spec} | {ppl:.2f} | {res.prune_seconds:.0f} |")
            out.write_text("\n".join(lines) + "\n")
            print(lines[-1], flush=True)


if __name__ == "__main__":
    main()
