"""The model card every pruned folder carries: README.md with the YAML metadata the Hugging Face Hub reads (base
model, library, tags, calibration data) and a body written from report.json."""

from __future__ import annotations

import json

CALIBRATION_DATASETS = {"c4": "allenai/c4", "ptb": "ptb_text_only"}


def _front_matter(report: dict, base_model: str | None) -> list[str]:
    """YAML, each value a JSON string (valid YAML, so no quoting rules to get wrong)."""
    target = report["sparsity"]["target"]
    kind = f"{target}-sparsity" if ":" in target else "unstructured-sparsity"
    tags = list(dict.fromkeys(["pruned", "sparse", "sparsellm", report["method"], kind]))
    lines = ["---"]
    if base_model:
        lines.append(f"base_model: {json.dumps(base_model)}")
    library = "sparsellm" if report.get("storage", {}).get("format") == "compressed" else "transformers"
    lines += [f"library_name: {library}", "pipeline_tag: text-generation", "tags:"]
    lines += [f"- {json.dumps(tag)}" for tag in tags]
    dataset = CALIBRATION_DATASETS.get(report["data"]["calibration"]["name"])
    if dataset:
        lines += ["datasets:", f"- {json.dumps(dataset)}"]
    return [*lines, "---"]


def _results(report: dict) -> list[str]:
    lines = []
    if report.get("perplexity"):
        names = list(report["perplexity"])
        lines += ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
        lines += ["| " + " | ".join(f"{report['perplexity'][n]:.2f}" for n in names) + " |", ""]
    if report.get("zeroshot"):
        z = report["zeroshot"]
        lines += [f"Zero-shot mean accuracy over {len(z['tasks'])} lm-eval tasks (first {z['limit']} items each): "
                  f"{z['mean_acc']:.4f}.", ""]  # fmt: skip
    return lines or ["Not evaluated at pruning time: `sparsellm eval THIS_FOLDER`.", ""]


def _storage(storage: dict) -> str:
    if storage.get("format") != "compressed":
        return "- Weights are stored dense (zeros included), loadable by transformers as they are."
    stored, dense = storage["bytes"] / 1e6, storage["dense_bytes"] / 1e6
    return (f"- Weights are stored compressed: {stored:.1f} MB against {dense:.1f} MB dense. Load with "
            "`sparsellm.load(THIS_FOLDER)`, or write the plain transformers folder with "
            "`sparsellm decompress THIS_FOLDER OUT`.")  # fmt: skip


def _recovery(recovery: dict) -> list[str]:
    if not recovery:
        return []
    config = recovery["config"]
    return [f"- Recovered after pruning: fine-tuned on {recovery['tokens']} tokens of {recovery['data']['name']} "
            f"(loss {config['loss']}, teacher {recovery['teacher']}), every pruned weight held at zero. The figures "
            "below are after recovery; report.json has them before too."]  # fmt: skip


def model_card(report: dict, base_model: str | None) -> str:
    """README.md for a pruned folder, from its report."""
    sparsity, config = report["sparsity"], report["config"]
    layers = config["layers_pruned"]
    body = [
        f"# {report['model']}, pruned with {report['method']} to {sparsity['target']}",
        "",
        f"Pruned in one shot by sparsellm {report['versions'].get('sparsellm', '')}.",
        "",
        f"- Method: {report['method']}; target {sparsity['target']}; measured sparsity {sparsity['measured']:.4f} of "
        f"the pruned linears ({sparsity['kept_over_total']} weights kept).",
        f"- Layers pruned: {layers[0]}..{layers[-1]} of {config['layers_total']}.",
        f"- Calibration: {config['nsamples']} x {config['seqlen']} tokens of {report['data']['calibration']['name']}, "
        f"seed {config['seed']}; protocol {report['protocol']}; arithmetic {report['precision'].get('name', 'fp32')}.",
        _storage(report.get("storage", {})),
        *_recovery(report.get("recovery", {})),
        "",
        f"## Perplexity ({report['protocol']} protocol)",
        "",
        *_results(report),
        "## Made by",
        "",
        "```",
        report.get("manifest", {}).get("command", ""),
        "```",
        "",
        "Every figure above comes from `report.json` in this folder; `sparsellm inspect THIS_FOLDER` re-measures the "
        "sparsity from the tensors.",
    ]
    return "\n".join([*_front_matter(report, base_model), "", *body]) + "\n"
