"""The `evaluate` flow: zero-shot classification and retrieval (`evaluation.evaluate`) as a Prefect run.

The UI shows the headline metrics beside their chance level and, for zero-shot classes, the majority baseline (a
table artifact), and where metrics.json and the HTML report were written.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from flows.params import retry_options
from evaluation.evaluate import EvaluateConfig, evaluate, output_files

# per-class details and the confusion matrix stay in metrics.json and the HTML report
_DETAILS = {"chance", "majority", "per_class_recall", "confusion_matrix", "class_names", "templates", "errors",
            "label_field", "model", "data"}


def headline_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float | int]:
    """Numbers of an evaluation as flat `zero_shot.acc@1` / `retrieval.text_to_image.R@5` keys."""
    flat: dict[str, float | int] = {}
    for key, value in metrics.items():
        if key in _DETAILS:
            continue
        if isinstance(value, dict):
            flat.update(headline_metrics(value, f"{prefix}{key}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


def metric_value(metrics: dict[str, Any], path: str) -> float | None:
    """The value at a dotted path such as `retrieval.text_to_image.R@5`, or None when the evaluation lacks it."""
    value: Any = metrics
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, int | float) else None


def metric_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows: metric, value and, where known, its chance level and majority baseline."""
    chance = headline_metrics({"zero_shot": metrics.get("zero_shot", {}).get("chance", {}),
                               "retrieval": metrics.get("retrieval", {}).get("chance", {})})
    majority = headline_metrics({"zero_shot": metrics.get("zero_shot", {}).get("majority", {})})
    return [{"metric": key, "value": round(value, 4) if isinstance(value, float) else value,
             "chance": round(chance[key], 4) if key in chance else "",
             "majority": round(majority[key], 4) if key in majority else ""}
            for key, value in headline_metrics(metrics).items()]


@task(name="evaluate-model", **retry_options())
def evaluate_task(config: EvaluateConfig) -> dict[str, Any]:
    """Embed the evaluation set with the model, classify and retrieve; writes metrics.json and report.html."""
    logger = get_run_logger()
    logger.info("evaluating %s on %s -> %s", config.model, config.data, config.output)
    metrics = evaluate(config, progress=False)
    for key, value in headline_metrics(metrics).items():
        logger.info("%s = %s", key, f"{value:.4f}" if isinstance(value, float) else value)
    return metrics


@flow(name="evaluate", log_prints=True)
def evaluate_flow(config: EvaluateConfig) -> dict[str, Any]:
    """Evaluate a model: zero-shot accuracy (when a label field is given) and image-text recall@k."""
    metrics = evaluate_task(config)
    files = ", ".join(output_files(config))
    create_table_artifact(metric_rows(metrics), key="evaluation-metrics",
                          description=f"Evaluation of {config.model} on {config.data}; files: {files}")
    return metrics
