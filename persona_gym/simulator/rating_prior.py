"""A collaborative prior on the five rating logits (``PromptConfig.cf_prior``).

The SLM reads the collaborative prediction in its prompt (``Predicted:3.6``), but a LoRA
adapter trained for a few hundred steps on a CPU does not learn to copy a number reliably (on
the ML-100k validation slice it stayed 0.07 stars of RMSE behind the prediction it was shown).
So the prediction also enters where the rating is read: the adapter's rating logits ``z`` (the
SLM's next-token logits of "1".."5") are added to a discretised Gaussian around it,

    logits_r = z_r + b_r - exp(log_precision) * (r - prediction - memory * surprise) ** 2,

for r = 1..5, where ``surprise`` is the window's mean of (rating - prediction): how the user's
last ratings departed from the collaborative model, a mood that carries over to the next one.
``log_precision``, ``memory`` and the five biases ``b`` are fitted first on the adapter's
training examples alone (:func:`fit_rating_prior`: seven numbers, a maximum-likelihood fit of
the rating given the prediction and the surprise), then trained on with the adapter. The SLM
then learns what the collaborative model misses: the user's persona, the short-term window,
the movie's text.
The evaluation reports the prior alone beside the simulator, so what the SLM adds is measured.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from persona_gym.ratings import RATING_VALUES

PRIOR_FILE = "rating_prior.pt"
RATINGS = torch.as_tensor(RATING_VALUES, dtype=torch.float32)

__all__ = [
    "PRIOR_FILE",
    "RatingPrior",
    "fit_rating_prior",
    "load_rating_prior",
    "load_rating_priors",
]


class RatingPrior(torch.nn.Module):
    """The learned collaborative prior of one adapter."""

    def __init__(self, precision: float = 0.5):
        super().__init__()
        self.log_precision = torch.nn.Parameter(torch.tensor(float(precision)).log())
        self.bias = torch.nn.Parameter(torch.zeros(5))
        self.memory = torch.nn.Parameter(torch.tensor(0.0))

    def forward(
        self, logits: torch.Tensor, predictions: torch.Tensor, surprises: torch.Tensor
    ) -> torch.Tensor:
        """``(N, 5)`` rating logits plus the prior around ``(N,)`` predicted ratings moved by
        ``memory`` times the ``(N,)`` window surprises."""
        ratings = RATINGS.to(logits.device)
        centre = predictions.to(logits.device, torch.float32) + self.memory * surprises.to(
            logits.device, torch.float32
        )
        distance = (ratings[None, :] - centre[:, None]) ** 2
        return logits + self.bias - self.log_precision.exp() * distance

    def nll(
        self, predictions: torch.Tensor, surprises: torch.Tensor, ratings: torch.Tensor
    ) -> torch.Tensor:
        """Mean negative log-likelihood of ``(N,)`` 1..5 ``ratings`` under the prior alone."""
        logits = self(torch.zeros(len(ratings), 5), predictions, surprises)
        return torch.nn.functional.cross_entropy(logits, ratings - 1)

    def save(self, folder: str | Path) -> None:
        torch.save(
            {
                "log_precision": self.log_precision.detach().cpu(),
                "bias": self.bias.detach().cpu(),
                "memory": self.memory.detach().cpu(),
            },
            Path(folder) / PRIOR_FILE,
        )


def fit_rating_prior(predictions, surprises, ratings, steps: int = 100) -> RatingPrior:
    """The prior's maximum-likelihood parameters for ``(N,)`` collaborative predictions, window
    surprises and 1..5 ratings, without the SLM (L-BFGS on the mean negative log-likelihood;
    deterministic)."""
    prior = RatingPrior()
    target = torch.from_numpy(np.array(ratings, dtype=np.int64))
    if not len(target):
        return prior
    if int(target.min()) < 1 or int(target.max()) > 5:
        raise ValueError("fit_rating_prior: ratings must be 1..5")
    predictions = torch.from_numpy(np.array(predictions, dtype=np.float32))
    surprises = torch.from_numpy(np.array(surprises, dtype=np.float32))
    optimizer = torch.optim.LBFGS(
        prior.parameters(), lr=1.0, max_iter=steps, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = prior.nll(predictions, surprises, target)
        loss.backward()
        return loss

    optimizer.step(closure)
    return prior


def load_rating_prior(folder: str | Path) -> RatingPrior:
    """The prior saved next to an adapter's weights; fail with the fix when it is missing."""
    path = Path(folder) / PRIOR_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: the prompt has cf_prior but this adapter was "
            "trained without it; retrain with `persona-gym train` (the shipped recipe has it)"
        )
    state = torch.load(path, weights_only=True)
    prior = RatingPrior()
    with torch.no_grad():
        prior.log_precision.copy_(state["log_precision"])
        prior.bias.copy_(state["bias"])
        prior.memory.copy_(state.get("memory", torch.tensor(0.0)))  # priors saved before it: none
    if not all(torch.isfinite(p).all() for p in prior.parameters()):
        raise ValueError(f"{path}: non-finite prior parameters; retrain the adapter")
    return prior.eval()


def load_rating_priors(adapters: dict[str, str | Path]) -> dict[str, RatingPrior]:
    """Each ``{name: folder}`` adapter's prior (on the CPU, where the rating logits are read)."""
    return {name: load_rating_prior(folder) for name, folder in adapters.items()}
