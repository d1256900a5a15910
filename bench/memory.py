"""Peak memory of a streaming prune against the model's size.

Writes a random-weight Llama-shaped model of about 1.1B parameters (TinyLlama's shape) as
safetensors shards into a temporary folder, one tensor at a time so building it needs little
memory, then prunes it with :func:`apt_viz.streaming.prune_streaming` in a fresh process and
records that process's peak RSS (and peak GPU memory on a GPU) against the float32 size.
Target: peak RSS under 40% of the model's float32 size.

    python bench/memory.py                     # writes bench/results/memory.md
    python bench/memory.py --layers 2 --out /tmp/memory.md   # a quick run
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def write_model(folder: Path, layers: int, hidden: int, inter: int, vocab: int) -> int:
    """Save a random Llama checkpoint block by block; returns its number of parameters."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=32,
                      num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False)
    with init_empty_weights():
        model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in model.named_parameters():
        part = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        groups.setdefault(part, {})[name] = p
    for part, params in groups.items():
        shard = f"model-{part}.safetensors"
        tensors = {}
        for name, p in params.items():
            t = torch.ones(p.shape) if p.dim() == 1 else torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5
            tensors[name] = t
            weight_map[name] = shard
            total += t.numel()
        save_file(tensors, str(folder / shard))
        del tensors
    cfg.save_pretrained(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return total


def peak_rss() -> int:
    """This process's peak RSS in bytes. Linux's ``VmHWM`` belongs to the process image, so it
    starts afresh at exec; ``ru_maxrss`` carries the parent's peak over into a child (here the
    parent's, which wrote the model), so it is only the fallback."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prune_child(src: str, out: str, method: str, nsamples: int, seqlen: int, device: str) -> None:
    """Runs in a fresh process: prune streaming and print peak memory as JSON."""
    from apt_viz import PruningPlan
    from apt_viz.streaming import prune_streaming

    import transformers  # noqa: F401  (loaded by the prune anyway: counted in the baseline)

    torch.empty(0, device=device)  # on a GPU, the CUDA runtime's libraries and context
    base = peak_rss()
    vocab = json.loads((Path(src) / "config.json").read_text())["vocab_size"]
    calib = torch.randint(0, vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    prune_streaming(src, out, calib, PruningPlan(method=method, sparsity=0.5), device=device, act_device="cpu", progress=False)
    peak_gpu = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
    print(json.dumps({"rss": peak_rss(), "base": base, "gpu": peak_gpu,
                      "seconds": time.perf_counter() - t0}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--method", default="sparsegpt")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory.md"))
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        prune_child(*args.child, args.method, args.nsamples, args.seqlen, args.device)
        return
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        src.mkdir()
        n = write_model(src, args.layers, args.hidden, args.intermediate, args.vocab)
        cmd = [sys.executable, __file__, "--child", str(src), str(out), "--method", args.method, "--nsamples",
               str(args.nsamples), "--seqlen", str(args.seqlen), "--device", args.device]
        # The child's progress and any traceback go straight to this process's stderr.
        res = json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1])
    size = 4 * n
    gib = 1 << 30
    lines = [
        "# Memory: streaming prune of a model larger than the memory it is given",
        "",
        f"Machine: {platform.platform()}, torch {torch.__version__}, device {args.device}.",
        f"Command: `python bench/memory.py {' '.join(argv if argv is not None else sys.argv[1:])}`".rstrip(),
        f"Model: random Llama, {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, vocab {args.vocab}: "
        f"{n / 1e9:.2f}B parameters, {size / gib:.2f} GiB in float32. Calibration {args.nsamples} x {args.seqlen} tokens, "
        f"{args.method} at 50%, activations kept on the CPU.",
        "",
        "| measure | value | share of float32 size |",
        "|---|---|---|",
        f"| peak RSS of the pruning process | {res['rss'] / gib:.2f} GiB | {res['rss'] / size:.0%} |",
        f"| of which before pruning (interpreter, torch, transformers{', the CUDA runtime' if res['gpu'] else ''}) "
        f"| {res['base'] / gib:.2f} GiB | {res['base'] / size:.0%} |",
    ]
    if res["gpu"]:
        lines.append(f"| peak GPU memory allocated | {res['gpu'] / gib:.2f} GiB | {res['gpu'] / size:.0%} |")
    lines += [f"| prune time | {res['seconds']:.0f} s | |", "", f"Target: peak RSS under 40% of the float32 size: "
              f"{'met' if res['rss'] < 0.4 * size else 'NOT met'}.", ""]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
