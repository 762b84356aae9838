"""One training recipe on the bundled catalog's shards, in one process: training wall clock and validation metrics.

    python bench/demo_recipe.py --data .clipforge/data/openmoji/train --patch-dropout 0.5 --context 20 --epochs 6

Trains `small` (with the given context length and layers) by `train_loop` on the shards `make demo` wrote, then
evaluates on the sibling `val` shards as the demo does. This is how the demo's recipe was chosen (README).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.recipe import print_result, train_and_evaluate  # noqa: E402
from training import model as models  # noqa: E402
from training.train import TrainConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=".clipforge/data/openmoji/train")
    parser.add_argument("--patch-dropout", type=float, default=0.0)
    parser.add_argument("--context", type=int, default=20, help="caption tokens read by the text tower")
    parser.add_argument("--layers", type=int, default=6, help="blocks per tower")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--precision", default="fp32", choices=["auto", "bf16", "fp32"])
    args = parser.parse_args()
    val = str(Path(args.data).with_name("val"))
    models.MODEL_PRESETS["recipe"] = models.MODEL_PRESETS["small"].derive(
        context_length=args.context, vision_layers=args.layers, text_layers=args.layers)

    config = TrainConfig(data=args.data, preset="recipe", epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         warmup_steps=20, precision=args.precision, patch_dropout=args.patch_dropout)
    seconds, results = train_and_evaluate(config, {"val": val}, args.precision)
    metrics = results["val"]
    print_result({"recipe": vars(args), "threads": torch.get_num_threads(), "train_seconds": round(seconds),
                  "text_to_image": metrics["retrieval"]["text_to_image"],
                  "zero_shot_acc@1": metrics["zero_shot"]["acc@1"]})


if __name__ == "__main__":
    main()
