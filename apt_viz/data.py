"""Text corpora, calibration / evaluation windows, perplexity and greedy generation.

Named corpora (``"wikitext2"``, ``"ptb"``, ``"c4"``) come from the Hugging Face dataset hub
through the optional ``datasets`` package; any local text file path works everywhere a corpus
name does, and is the way to work offline.

Perplexity follows the SparseGPT / Wanda evaluation exactly: consecutive non-overlapping
windows of ``seqlen`` tokens, per-window mean next-token cross entropy ``loss``, and
``ppl = exp(sum(loss * seqlen) / (n * seqlen))``.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from . import cpu_matmul
from .checks import DataError

__all__ = [
    "CORPORA",
    "CorpusUnavailableError",
    "calibration_windows",
    "eval_windows",
    "generate",
    "load_text",
    "max_seqlen",
    "perplexity",
    "shared_data_path",
    "tokenize_text",
]

#: Named corpora accepted by :func:`load_text`, with where they come from.
CORPORA: dict[str, str] = {
    "wikitext2": 'Salesforce/wikitext, config "wikitext-2-raw-v1" (documents joined with "\\n\\n")',
    "ptb": 'ptb-text-only/ptb_text_only (field "sentence", joined with " ")',
    "c4": (
        "allenai/c4, English shards en/c4-train.00000-of-01024 (first 5000 documents, joined with "
        '"\\n\\n") and en/c4-validation.00000-of-00008 (first 1100 documents, joined with " ")'
    ),
}

_ALIASES = {
    "wikitext2": "wikitext2",
    "wikitext-2": "wikitext2",
    "wikitext": "wikitext2",
    "ptb": "ptb",
    "c4": "c4",
}

_SPLITS = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation", "test": "test"}

# C4 shards are large; only the first documents are used (SparseGPT / Wanda evaluate on the
# first 1100 validation documents).
_C4_MAX_DOCS = {"train": 5000, "validation": 1100}


class CorpusUnavailableError(RuntimeError):
    """A named corpus could not be loaded (``datasets`` missing or the hub unreachable)."""


# --------------------------------------------------------------------------- corpora


def _local_fix(name: str) -> str:
    return (
        f"Pass the path of a local text file instead of {name!r}, e.g. "
        f'load_text("/path/to/wiki.test.raw") (any UTF-8 text file works).'
    )


def _load_named(corpus: str, split: str) -> str:
    try:
        import datasets  # optional dependency
    except ImportError as exc:
        raise CorpusUnavailableError(
            f"Loading the named corpus {corpus!r} needs the optional package `datasets` "
            f"(pip install 'apt_viz[data]'), which is not installed. {_local_fix(corpus)}"
        ) from exc

    try:
        if corpus == "wikitext2":
            ds = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split=split)
            return "\n\n".join(ds["text"])
        if corpus == "ptb":
            ds = datasets.load_dataset("ptb-text-only/ptb_text_only", split=split)
            return " ".join(ds["sentence"])
        if corpus == "c4":
            ds = datasets.load_dataset(
                "allenai/c4",
                data_files={
                    "train": "en/c4-train.00000-of-01024.json.gz",
                    "validation": "en/c4-validation.00000-of-00008.json.gz",
                },
                split=split,
            )
            n = min(len(ds), _C4_MAX_DOCS[split])
            texts = ds.select(range(n))["text"] if hasattr(ds, "select") else ds["text"][:n]
            return " ".join(texts) if split == "validation" else "\n\n".join(texts)
    except Exception as exc:  # network errors, offline mode, missing hub files, ...
        raise CorpusUnavailableError(
            f"Could not load the named corpus {corpus!r} (split {split!r}) from the Hugging Face hub: "
            f"{type(exc).__name__}: {exc}. The hub may be unreachable or in offline mode. {_local_fix(corpus)}"
        ) from exc
    raise AssertionError(corpus)  # pragma: no cover


def load_text(name_or_path: str | os.PathLike, split: str = "validation") -> str:
    """Return the text of a named corpus split or of a local text file.

    ``name_or_path`` is one of ``CORPORA`` ("wikitext2", "ptb", "c4"; loaded from the hub with
    ``datasets``) or a path to a UTF-8 text file (``split`` is then ignored). An existing file
    wins over a corpus name. Raises :class:`CorpusUnavailableError` when a named corpus cannot
    be loaded, ``FileNotFoundError`` for a missing file and ``ValueError`` for an empty one.
    """
    path = Path(os.fspath(name_or_path)).expanduser()
    key = os.fspath(name_or_path).strip().lower()
    if path.is_file():
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise DataError(f"Text file {str(path)!r} is empty: found 0 tokens of text; pass a file that holds the text to calibrate or evaluate on.")
        return text
    if key in _ALIASES:
        corpus = _ALIASES[key]
        sp = _SPLITS.get(split.strip().lower())
        if sp is None or (corpus == "c4" and sp == "test"):
            valid = "train, validation" if corpus == "c4" else "train, validation, test"
            raise ValueError(f"Unknown split {split!r} for corpus {corpus!r}; use one of: {valid}")
        return _load_named(corpus, sp)
    if path.exists():
        raise ValueError(f"{str(path)!r} is not a regular text file")
    raise FileNotFoundError(
        f"{os.fspath(name_or_path)!r} is neither a named corpus ({', '.join(CORPORA)}) nor an existing text file"
    )


def shared_data_path(relpath: str | os.PathLike) -> Path | None:
    """Locate ``relpath`` inside the offline corpora folder ``../shared/data/`` next to the project.

    Looks under ``$APT_VIZ_SHARED_DATA`` (if set), then ``<project root>/../shared/data`` and
    ``<cwd>/../shared/data``. Returns ``None`` when the file is absent (tests should then skip).
    """
    candidates: list[Path] = []
    env = os.environ.get("APT_VIZ_SHARED_DATA")
    if env:
        candidates.append(Path(env).expanduser())
    root = Path(__file__).resolve().parent.parent
    candidates.append(root.parent / "shared" / "data")
    candidates.append(Path.cwd().parent / "shared" / "data")
    for base in candidates:
        p = base / relpath
        if p.is_file():
            return p
    return None


# --------------------------------------------------------------------------- tokens and windows


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenise ``text`` once, without special tokens; returns a 1-D LongTensor of ids."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    enc = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)
    ids = enc["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def _as_ids(tokenizer: Any, text: str | torch.Tensor) -> torch.Tensor:
    if isinstance(text, torch.Tensor):
        return text.reshape(-1).long()
    return tokenize_text(tokenizer, text)


def _check_positive(**kwargs: int) -> None:
    for k, v in kwargs.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{k} must be a positive integer, got {v!r}")


def calibration_windows(
    tokenizer: Any,
    text: str | torch.Tensor,
    nsamples: int = 32,
    seqlen: int = 512,
    seed: int = 0,
) -> torch.Tensor:
    """Draw ``nsamples`` random windows of ``seqlen`` tokens from ``text`` (SparseGPT-style).

    The text is tokenised once (or ``text`` may already be a 1-D tensor of token ids); start
    indices are drawn as ``random.Random(seed).randint(0, n_tokens - seqlen - 1)``, so the
    result depends only on ``seed`` and never on the global RNG state. Returns a LongTensor of
    shape ``(nsamples, seqlen)``.
    """
    _check_positive(nsamples=nsamples, seqlen=seqlen)
    ids = _as_ids(tokenizer, text)
    n = ids.numel()
    if n < seqlen + 1:
        raise DataError(
            f"Text too short for calibration: found {n} tokens, need at least {seqlen + 1} "
            f"for windows of seqlen={seqlen}. Use a longer text or a smaller seqlen."
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, n - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts]).contiguous()


def eval_windows(
    tokenizer: Any,
    text: str | torch.Tensor,
    seqlen: int = 512,
    nwindows: int | None = None,
    bos: bool = False,
) -> torch.Tensor:
    """Split ``text`` into consecutive non-overlapping windows of ``seqlen`` tokens from the start.

    The incomplete tail is dropped; ``nwindows`` keeps at most that many windows. With
    ``bos=True`` each window is ``[bos_token_id]`` followed by the next ``seqlen - 1`` text
    tokens (models such as Gemma need a BOS). Returns a LongTensor ``(n, seqlen)``.
    """
    _check_positive(seqlen=seqlen)
    if nwindows is not None:
        _check_positive(nwindows=nwindows)
    ids = _as_ids(tokenizer, text)
    step = seqlen
    if bos:
        bos_id = getattr(tokenizer, "bos_token_id", None)
        if bos_id is None:
            raise ValueError("bos=True but the tokenizer has no bos_token_id")
        if seqlen < 2:
            raise ValueError("bos=True needs seqlen >= 2")
        step = seqlen - 1
    n = ids.numel() // step
    if n == 0:
        raise DataError(
            f"Text too short for evaluation: found {ids.numel()} tokens, need at least {step} "
            f"for one window of seqlen={seqlen}{' (with BOS)' if bos else ''}. Use a longer text or a smaller seqlen."
        )
    if nwindows is not None:
        n = min(n, nwindows)
    body = ids[: n * step].reshape(n, step)
    if bos:
        body = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), body], dim=1)
    return body.contiguous()


# --------------------------------------------------------------------------- model helpers


def _model_device(model: torch.nn.Module) -> torch.device:
    dev = getattr(model, "device", None)
    if isinstance(dev, torch.device):
        return dev
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> float:
    """Perplexity of ``model`` on ``windows`` (LongTensor ``(n, seqlen)``), as SparseGPT / Wanda compute it.

    For each window, ``loss`` is the mean cross entropy of the ``seqlen - 1`` next-token
    predictions, ``nll = loss * seqlen``, and ``ppl = exp(sum(nll) / (n * seqlen))``. Inputs go
    to ``device`` (default: the model's device); the model is not moved.
    """
    from tqdm.auto import tqdm

    if windows.dim() != 2:
        raise ValueError(f"windows must have shape (n, seqlen), got {tuple(windows.shape)}")
    n, seqlen = windows.shape
    if n == 0 or seqlen < 2:
        raise ValueError(f"need at least one window of seqlen >= 2, got shape {tuple(windows.shape)}")
    _check_positive(batch_size=batch_size)
    dev = torch.device(device) if device is not None else _model_device(model)
    was_training = model.training
    model.eval()
    total_nll = torch.zeros((), dtype=torch.float64)
    try:
        with cpu_matmul.fast_linears(model):
            for i in tqdm(range(0, n, batch_size), desc="perplexity", disable=not progress, unit="batch"):
                batch = windows[i : i + batch_size].to(dev)
                logits = model(batch, use_cache=False).logits
                shift_logits = logits[:, :-1, :].float()
                shift_labels = batch[:, 1:]
                loss = F.cross_entropy(
                    shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), reduction="none"
                ).view(batch.size(0), seqlen - 1)
                nll = loss.mean(dim=1) * seqlen  # per-window mean loss times seqlen
                total_nll += nll.double().sum().cpu()
                del logits, shift_logits, loss
    finally:
        model.train(was_training)
    return float(math.exp(total_nll.item() / (n * seqlen)))


def _config_max_positions(config: Any) -> int | None:
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            v = getattr(cfg, attr, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def max_seqlen(model: torch.nn.Module, requested: int = 2048) -> int:
    """``requested`` capped at the model's ``max_position_embeddings`` (when the config has one)."""
    _check_positive(requested=requested)
    limit = _config_max_positions(getattr(model, "config", None))
    return min(requested, limit) if limit is not None else requested


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: Sequence[str] | str, max_new_tokens: int = 32) -> list[str]:
    """Greedy continuation of each prompt; returns only the newly generated text per prompt."""
    from transformers import GenerationConfig

    if isinstance(prompts, str):
        prompts = [prompts]
    _check_positive(max_new_tokens=max_new_tokens)
    dev = _model_device(model)
    base = getattr(model, "generation_config", None)
    eos = getattr(base, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (
        eos[0] if isinstance(eos, (list, tuple)) else eos
    )
    # A fresh config, so sampling settings stored with the model (temperature, top_p) are ignored.
    gen_cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=getattr(base, "bos_token_id", None),
    )
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    try:
        with cpu_matmul.fast_linears(model):
            for prompt in prompts:
                enc = tokenizer(prompt, return_tensors="pt")
                input_ids = enc["input_ids"].to(dev)
                attn = enc.get("attention_mask")
                attn = attn.to(dev) if attn is not None else torch.ones_like(input_ids)
                out = model.generate(input_ids=input_ids, attention_mask=attn, generation_config=gen_cfg)
                new_tokens = out[0, input_ids.shape[1] :]
                outputs.append(tokenizer.decode(new_tokens, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return outputs
