"""A collaborative prior on the five rating logits (``PromptConfig.cf_prior``).

The SLM reads the collaborative prediction in its prompt (``Predicted:3.6``), but a LoRA
adapter trained for a few hundred steps on a CPU does not learn to copy a number reliably (on
the ML-100k validation slice it stayed 0.07 stars of RMSE behind the prediction it was shown).
So the prediction also enters where the rating is read: the adapter's rating logits ``z`` (the
SLM's next-token logits of "1".."5") are added to a discretised Gaussian around it,

    logits_r = z_r + b_r - exp(log_precision) * (r - prediction) ** 2,     r = 1..5,

with ``log_precision`` and the five biases ``b`` learned with each adapter (one scalar and five
numbers; they start at a Gaussian of standard deviation 1 and no bias). The SLM then learns what
the collaborative model misses: the user's persona, the short-term window, the movie's text.
The evaluation reports the prior alone beside the simulator, so what the SLM adds is measured.
"""

from __future__ import annotations

from pathlib import Path

import torch

from persona_gym.ratings import RATING_VALUES

PRIOR_FILE = "rating_prior.pt"
RATINGS = torch.as_tensor(RATING_VALUES, dtype=torch.float32)

__all__ = ["PRIOR_FILE", "RatingPrior", "load_rating_prior", "load_rating_priors"]


class RatingPrior(torch.nn.Module):
    """The learned collaborative prior of one adapter."""

    def __init__(self, precision: float = 0.5):
        super().__init__()
        self.log_precision = torch.nn.Parameter(torch.tensor(float(precision)).log())
        self.bias = torch.nn.Parameter(torch.zeros(5))

    def forward(self, logits: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
        """``(N, 5)`` rating logits plus the prior around ``(N,)`` predicted ratings."""
        ratings = RATINGS.to(logits.device)
        distance = (ratings[None, :] - predictions.to(logits.device, torch.float32)[:, None]) ** 2
        return logits + self.bias - self.log_precision.exp() * distance

    def save(self, folder: str | Path) -> None:
        torch.save({"log_precision": self.log_precision.detach().cpu(), "bias": self.bias.detach().cpu()},
                   Path(folder) / PRIOR_FILE)


def load_rating_prior(folder: str | Path) -> RatingPrior:
    """The prior saved next to an adapter's weights; fail with the fix when it is missing."""
    path = Path(folder) / PRIOR_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: the prompt has cf_prior but this adapter was "
                                "trained without it; retrain with `persona-gym train --cf-prior`")
    state = torch.load(path, weights_only=True)
    prior = RatingPrior()
    with torch.no_grad():
        prior.log_precision.copy_(state["log_precision"])
        prior.bias.copy_(state["bias"])
    if not torch.isfinite(prior.log_precision) or not torch.isfinite(prior.bias).all():
        raise ValueError(f"{path}: non-finite prior parameters; retrain the adapter")
    return prior.eval()


def load_rating_priors(adapters: dict[str, str | Path]) -> dict[str, RatingPrior]:
    """Each ``{name: folder}`` adapter's prior (on the CPU, where the rating logits are read)."""
    return {name: load_rating_prior(folder) for name, folder in adapters.items()}
