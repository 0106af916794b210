"""Zero-shot accuracy through lm-evaluation-harness, on the model in memory.

Offline (the default) each task is lm-eval's stock config with only its data source replaced by the bundled
rows (sparsellm.data.zeroshot), so prompts, choices and scoring are lm-eval's own. With SPARSELLM_ONLINE=1
the stock tasks are used as they are (hub datasets). Scoring follows the papers: zero-shot, no BOS token.
"""

from __future__ import annotations

import functools
import logging
import math
from pathlib import Path

from torch import nn

from ..core import parallel, precision
from ..core.errors import UserError
from ..data import texts
from ..data import zeroshot as data

METRICS = ("acc", "acc_norm", "perplexity")


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError as e:
        raise UserError("zero-shot tasks need lm-evaluation-harness: pip install 'sparsellm[zeroshot]'") from e
    return lm_eval, HFLM, TaskManager, load_yaml


@functools.cache
def _task_manager():
    """Indexing lm-eval's thousands of task configs takes ~10 s: do it once per process."""
    return _lm_eval()[2]()


def local_task_config(name: str, task_data: data.TaskData, limit: int | None = None) -> dict:
    """lm-eval's stock config of `name`, reading `task_data.rows` (the first `limit`) as its one evaluation split.

    lm-eval's own `limit` takes the first N documents too; cutting the rows first only saves preprocessing.
    """
    import datasets

    load_yaml = _lm_eval()[3]
    cfg = load_yaml(_task_manager().task_index[name].yaml_path, resolve_func=True)
    for key in ("tag", "group"):
        cfg.pop(key, None)
    split_key = "test_split" if cfg.get("test_split") else "validation_split"
    split = cfg[split_key]
    rows = task_data.rows[:limit]
    cfg.update(training_split=None, validation_split=None, test_split=None, fewshot_split=None)
    cfg[split_key] = split
    cfg.update(
        dataset_path=task_data.source,
        dataset_name=None,
        dataset_kwargs={},
        custom_dataset=lambda **_: datasets.DatasetDict({split: datasets.Dataset.from_list(rows)}),
    )
    return cfg


def _task_specs(tasks: list[str], online: bool, hellaswag_file: Path | None, limit: int | None) -> tuple[list, dict]:
    specs, provenance = [], {}
    for name in tasks:
        if online:
            specs.append(name)
            provenance[name] = {"source": "lm-eval stock task (hub dataset)", "exact": True}
            continue
        task_data = data.load(name, hellaswag_file)
        specs.append(local_task_config(name, task_data, limit))
        provenance[name] = {
            "source": task_data.source,
            "sha256": task_data.sha256,
            "exact": task_data.exact,
            "items": len(task_data.rows),
        }
        if not task_data.exact:
            provenance[name]["note"] = (
                "preprocessed HellaSwag text, NOT lm-eval-exact: supply the original "
                "hellaswag_val.jsonl with --hellaswag-file for the real task"
            )
    return specs, provenance


def _metrics(result: dict) -> dict:
    out = {}
    for metric in METRICS:
        if f"{metric},none" in result:
            value, stderr = result[f"{metric},none"], result.get(f"{metric}_stderr,none")
            out[metric] = float(value)
            out[f"{metric}_stderr"] = float(stderr) if isinstance(stderr, int | float) else math.nan
    return out


def evaluate_zeroshot(
    model: nn.Module,
    tokenizer,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 8,
    online: bool = False,
    hellaswag_file: Path | None = None,
    log_samples: bool = False,
    precision_name: str = "auto",
) -> tuple[dict[str, dict], dict]:
    """({task: {acc, acc_stderr, acc_norm, acc_norm_stderr, n}}, provenance); `limit`: first N items per task.

    With `log_samples`, each task's entry also holds lm-eval's per-item records under "samples". The model runs
    in `precision_name` (auto, bf16 or fp32; engine/precision.py), recorded in each task's provenance.
    """
    lm_eval, HFLM, _, _ = _lm_eval()
    specs, provenance = _task_specs(tasks, online, hellaswag_file, limit)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task chatter drowns the table
    device = next(model.parameters()).device
    chosen = precision.resolve(precision_name, device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device), add_bos_token=False)
    with precision.using(chosen), precision.forward(device):
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=specs,
            limit=limit,
            log_samples=log_samples,
            bootstrap_iters=1000,
            verbosity="ERROR",
            task_manager=_task_manager(),
        )
    results = {}
    for name in tasks:
        results[name] = {**_metrics(out["results"][name]), "n": int(out["n-samples"][name]["effective"])}
        provenance[name]["precision"] = chosen.as_dict()
        if log_samples:
            results[name]["samples"] = out["samples"][name]
    return results, provenance


def check_request(spec: str, limit: int | None, hellaswag_file: Path | None) -> list[str]:
    """Validate --tasks/--limit/--hellaswag-file before any slow work; the task names to run."""
    tasks = data.parse_tasks(spec)
    if limit is not None and limit < 1:
        raise UserError("--limit must be at least 1")
    if hellaswag_file is not None and not Path(hellaswag_file).is_file():
        raise UserError(f"--hellaswag-file {hellaswag_file} does not exist; give the original hellaswag_val.jsonl")
    if tasks and parallel.world() > 1:
        raise UserError("--tasks under torchrun is not supported; evaluate the saved folder with `sparsellm eval`")
    if tasks:
        _lm_eval()
    if not texts.default_online():
        for name in tasks:
            data.load(name, hellaswag_file)  # a missing or altered file is an error now, not after the model loads
    return tasks


def summary(results: dict[str, dict], limit: int | None) -> dict:
    """The report's `zeroshot` entry: per-task metrics, their mean `acc` (the papers' figure), the protocol."""
    accs = [r["acc"] for r in results.values() if "acc" in r]
    return {
        "tasks": results,
        "mean_acc": sum(accs) / len(accs) if accs else math.nan,
        "limit": limit,
        "num_fewshot": 0,
        "add_bos_token": False,
    }
