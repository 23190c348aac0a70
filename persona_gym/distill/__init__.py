"""Distillation (paper §3.2): each user's training history as text, ``Ms`` and ``Ml``.

For every user of a split, from the *training* interactions only (plus item averages from
``Split.item_stats``, which exclude test):

* ``Ms``, the profile: general traits (rating tendency and spread, genre likes and dislikes with
  evidence, era, activity, conformity, diversity, demographics), short enough to be a system
  prompt;
* ``Ml``, one enriched memory per training interaction: the item and a first-person reason.

Here: the result type and the artifacts' tables (:mod:`.memories`), the traits (:mod:`.traits`)
and the deterministic :class:`DataDistiller` (:mod:`.templates`), which the runtime needs to
rebuild a shipped simulator's tables. The LLM distiller and ``persona-gym distill`` live in
``training/distill.py``.
"""

from persona_gym.distill.memories import (
    MEMORY_COLUMNS,
    Distiller,
    UserMemories,
    memories_frame,
    select_users,
    training_rows,
    write_artifacts,
)
from persona_gym.distill.templates import DataDistiller, memory_text, profile_text
from persona_gym.distill.traits import DataDistillerConfig, compute_traits

__all__ = [
    "MEMORY_COLUMNS",
    "DataDistiller",
    "DataDistillerConfig",
    "Distiller",
    "UserMemories",
    "compute_traits",
    "memories_frame",
    "memory_text",
    "profile_text",
    "select_users",
    "training_rows",
    "write_artifacts",
]
