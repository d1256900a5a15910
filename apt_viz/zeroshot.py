"""Optional zero-shot tasks (HellaSwag, ARC, ...) through lm-eval, on the model in memory.

lm-eval is an optional extra (``pip install -e ".[eval]"``) and its tasks download their data from
the Hugging Face hub. When either is missing the result carries a message saying why the tasks
were skipped and how to enable them; callers log it and carry on.
"""

from __future__ import annotations

import math
import os
import socket
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence
from urllib.parse import urlparse

import torch

INSTALL_HINT = 'install the extra with `pip install -e ".[eval]"` (it provides lm-eval)'


@dataclass
class ZeroShotResult:
    """Per-task metrics (``{"hellaswag": {"acc,none": 0.31, ...}}``), or why the tasks were skipped."""

    tasks: list[str]
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    message: str | None = None

    @property
    def ran(self) -> bool:
        return self.message is None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lm_eval_missing() -> str | None:
    """Why lm-eval cannot be used here, or ``None`` when it can be imported."""
    try:
        import lm_eval  # noqa: F401
        from lm_eval.models.huggingface import HFLM  # noqa: F401
    except ImportError as exc:
        return f"zero-shot tasks skipped: lm-eval is not importable ({exc}); {INSTALL_HINT}"
    return None


def zero_shot(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: Sequence[str],
    *,
    batch_size: int = 1,
    limit: int | float | None = None,
    num_fewshot: int = 0,
) -> ZeroShotResult:
    """Run lm-eval's ``simple_evaluate`` on ``model`` as it is in memory (pruned or not).

    Never raises for a missing lm-eval or an unreachable hub: the returned result's ``message``
    says what happened. ``limit`` caps the examples per task (for a quick look).
    """
    tasks = list(tasks)
    missing = lm_eval_missing()
    if missing:
        return ZeroShotResult(tasks, message=missing)
    unreachable = hub_unreachable()
    if unreachable:
        return ZeroShotResult(tasks, message=f"zero-shot tasks {tasks} skipped: {unreachable}")
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, log_samples=False)
    except Exception as exc:  # task data comes from the hub; any failure there must not end the pruning job
        return ZeroShotResult(tasks, message=(
            f"zero-shot tasks {tasks} skipped: lm-eval failed ({type(exc).__name__}: {exc}). Their datasets come "
            "from the Hugging Face hub, which must be reachable (or cached, with HF_DATASETS_OFFLINE=1); "
            "task names are listed by `lm-eval ls tasks`"
        ))
    results = (out or {}).get("results", {})
    scores = {
        task: {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        for task, metrics in results.items()
    }
    return ZeroShotResult(tasks, scores=scores)


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the dataset hub cannot be reached, or ``None``; skipped in offline mode (datasets come from the cache).

    Without this check, an offline machine spends minutes in lm-eval's download retries before failing.
    """
    if any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return None
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((host.hostname or "huggingface.co", host.port or 443), timeout=timeout).close()
    except OSError as exc:
        return (f"the Hugging Face hub ({host.hostname}) is unreachable ({exc}); lm-eval tasks download their data from it. "
                "With the datasets already cached, set HF_DATASETS_OFFLINE=1 to use the cache")
    return None


def headline(scores: dict[str, float]) -> tuple[str, float] | None:
    """The metric a table shows for a task: normalised accuracy, else accuracy, else the first one."""
    for key in ("acc_norm,none", "acc,none"):
        if key in scores:
            return key.split(",")[0], scores[key]
    rest = [(k, v) for k, v in scores.items() if "stderr" not in k and k != "sample_len"]
    return (rest[0][0].split(",")[0], rest[0][1]) if rest else None
