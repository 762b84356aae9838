"""What the recipe benchmarks share (`demo_recipe.py`, `cross_style.py`, `noisy_filter.py`): train in this process,
then evaluate; print each result as one JSON line.

`train_and_evaluate` trains a tokenizer on the dataset's captions (a fine-tune keeps its parent's), runs `train_loop`
(as each Ray Train worker of `clipforge train` does) and evaluates the final model on image sets by zero-shot over the
Unicode groups and retrieval, as the demo does.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.manifest import read_manifest
from training.data import read_captions
from evaluation.evaluate import EvaluateConfig, evaluate
from training.model import MODEL_PRESETS
from training.tokenizer import Tokenizer, train_tokenizer
from training.train import TrainConfig, train_loop


def train_and_evaluate(config: TrainConfig, evaluations: dict[str, str], precision: str = "auto",
                       keep_model: Path | None = None) -> tuple[float, dict[str, dict]]:
    """(training seconds, metrics of each named evaluation set) of one run of `config`; the final checkpoint is
    copied to `keep_model` when given."""
    with tempfile.TemporaryDirectory(prefix="bench-recipe-") as scratch:
        out = Path(scratch)
        if config.init_from:  # a fine-tune keeps its parent's tokenizer
            Tokenizer.load(config.init_from).save(out / "tokenizer")
        else:
            captions = read_captions(read_manifest(config.data), caption_field=config.caption_field)
            train_tokenizer(captions, vocab_size=8192,
                            context_length=MODEL_PRESETS[config.preset].context_length).save(out / "tokenizer")
        config = config.model_copy(update={"output": str(out / "run"), "checkpoint_every": 1_000_000})

        def report(metrics: dict, directory: Path | None) -> None:
            if directory is not None:
                shutil.copytree(directory, out / "model", dirs_exist_ok=True)

        started = time.perf_counter()
        train_loop(config, out / "tokenizer", report)
        seconds = time.perf_counter() - started
        results = {name: evaluate(EvaluateConfig(model=str(out / "model"), data=data, output=str(out / "eval" / name),
                                                 label_field="group", templates="emoji", precision=precision,
                                                 report=False), progress=False)
                   for name, data in evaluations.items()}
        if keep_model is not None:
            shutil.copytree(out / "model", keep_model, dirs_exist_ok=True)
    return seconds, results


def print_result(result: dict, results_file: str | None = None) -> None:
    """Print the run's result as one JSON line, and append it to `results_file` when given (a JSON-lines log)."""
    line = json.dumps(result)
    print(line)
    if results_file:
        with open(results_file, "a", encoding="utf-8") as file:
            file.write(line + "\n")
