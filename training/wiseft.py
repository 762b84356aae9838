"""WiSE-FT: robust fine-tuning by weight interpolation (Wortsman et al., "Robust fine-tuning of zero-shot models", 2022).

After a fine-tune, every weight is mixed between the starting model and the fine-tuned one,
`(1 - mixing_weight) * start + mixing_weight * tuned`, over a grid of mixing weights. Each mix is evaluated on the
new domain's validation set and on a guardrail set (the parent's validation set); the chosen mix is the best on the
domain among those whose guardrail metric falls by no more than `tolerance` from the starting model's (mixing weight
0), and it is worth promoting only if it beats the starting model on the domain. Mixing weight 0 is the start, 1 the
fine-tuned model.
"""

from __future__ import annotations

import io
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from pydantic import BaseModel

from pipeline import storage
from pipeline.storage import StorageConfig
from training.checkpoint import load_model, save_checkpoint, upload_checkpoint
from training.model import CLIP


class GridPoint(BaseModel):
    """One mixing weight and what its model scored."""

    mixing_weight: float
    """0: the starting model's weights, 1: the fine-tuned model's."""
    model: str
    """Location of the interpolated checkpoint."""
    domain: float | None
    """The domain metric on the new catalog's validation set."""
    guardrail: float | None
    """The guardrail metric on the parent's validation set."""


class WiseChoice(BaseModel):
    """The chosen mixing weight and whether it should be promoted, with the reason in one sentence."""

    chosen: GridPoint
    start: GridPoint
    promote: bool
    reason: str


@torch.no_grad()
def interpolate(start: CLIP, tuned: CLIP, mixing_weight: float) -> CLIP:
    """A new model whose every weight is (1 - mixing_weight) * start + mixing_weight * tuned (same shapes)."""
    if start.config != tuned.config:
        raise ValueError("WiSE-FT mixes models of one shape; the fine-tuned model's config differs from its start")
    mixed = CLIP(tuned.config)
    tuned_state = tuned.state_dict()
    mixed.load_state_dict({name: torch.lerp(weight.float(), tuned_state[name].float(), mixing_weight)
                           for name, weight in start.state_dict().items()})
    return mixed.eval()


def write_grid(start: str, tuned: str, mixing_weights: Sequence[float], output: str,
               storage_config: StorageConfig | None = None) -> dict[float, str]:
    """Write one checkpoint per mixing weight under `output/mix-<w>`; returns {mixing weight: location}."""
    start_model, _ = load_model(start, storage_config)
    tuned_model, tokenizer = load_model(tuned, storage_config)
    locations = {}
    with tempfile.TemporaryDirectory(prefix="clipforge-wiseft-") as scratch:
        for weight in sorted(set(mixing_weights)):
            location = storage.join(output, f"mix-{weight:.2f}")
            local = save_checkpoint(Path(scratch) / f"mix-{weight:.2f}", interpolate(start_model, tuned_model, weight),
                                    tokenizer, state={"wise_ft": {"mixing_weight": weight, "start": start,
                                                                  "tuned": tuned}})
            locations[weight] = upload_checkpoint(local, location, storage_config)
    return locations


def evaluate_grid(models: dict[float, str], domain: Callable[[str, str], float | None],
                  guardrail: Callable[[str, str], float | None]) -> list[GridPoint]:
    """Each model scored by `domain(model, name)` and `guardrail(model, name)` (callables that evaluate)."""
    return [GridPoint(mixing_weight=w, model=m, domain=domain(m, f"mix-{w:.2f}"), guardrail=guardrail(m, f"mix-{w:.2f}"))
            for w, m in sorted(models.items())]


def choose_mixing_weight(points: list[GridPoint], tolerance: float, domain_metric: str = "domain",
                         guardrail_metric: str = "guardrail") -> WiseChoice:
    """The best domain score among the mixes whose guardrail stays within `tolerance` of the start's (mixing weight
    0); ties go to the smaller mixing weight (closer to the start). Promote only if it beats the start on the domain."""
    start = min(points, key=lambda p: p.mixing_weight)
    if start.mixing_weight != 0 or start.domain is None or start.guardrail is None:
        raise ValueError("the grid must include mixing weight 0 (the starting model) with both metrics")
    floor = start.guardrail - tolerance
    eligible = [p for p in points if p.guardrail is not None and p.domain is not None and p.guardrail >= floor]
    chosen = max(eligible, key=lambda p: (p.domain, -p.mixing_weight))  # the start itself is always eligible
    if chosen.mixing_weight == 0 or chosen.domain <= start.domain:
        reason = (f"no mixing weight improves {domain_metric} over the promoted model ({start.domain:.4f}) with "
                  f"{guardrail_metric} >= {floor:.4f}: keeping the promoted model")
        return WiseChoice(chosen=chosen, start=start, promote=False, reason=reason)
    reason = (f"mixing weight {chosen.mixing_weight:g}: {domain_metric} {chosen.domain:.4f} > {start.domain:.4f} "
              f"(promoted model), {guardrail_metric} {chosen.guardrail:.4f} >= {floor:.4f} (promoted model "
              f"{start.guardrail:.4f} - tolerance {tolerance:g})")
    return WiseChoice(chosen=chosen, start=start, promote=True, reason=reason)


def grid_plot(points: list[GridPoint], choice: WiseChoice, domain_metric: str, guardrail_metric: str,
              tolerance: float) -> bytes:
    """PNG of both metrics over the mixing weights, the guardrail floor and the chosen weight marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = [p.mixing_weight for p in points]
    figure, axis = plt.subplots(figsize=(6, 3.6), dpi=100)
    axis.plot(weights, [p.domain for p in points], "o-", label=f"domain: {domain_metric}")
    axis.plot(weights, [p.guardrail for p in points], "s-", label=f"guardrail: {guardrail_metric}")
    axis.axhline(choice.start.guardrail - tolerance, color="grey", linestyle=":", label="guardrail floor")
    axis.axvline(choice.chosen.mixing_weight, color="green" if choice.promote else "red", linestyle="--",
                 label=f"chosen ({'promoted' if choice.promote else 'not promoted'})")
    axis.set_xlabel("mixing weight (0: promoted model, 1: fine-tuned)")
    axis.set_ylabel("metric")
    axis.set_title("WiSE-FT")
    axis.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
