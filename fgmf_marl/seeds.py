"""Where every seed of a run comes from: one offset per purpose, so no two purposes share seeds.

A run with seed ``s`` trains on env seeds ``s, s + 1, ...``; everything that must not see the
training episodes adds its own offset here (evaluation, the adversary's training episodes, the
explanation study), which is what makes "evaluated on fresh seeds" true by construction.
"""
from __future__ import annotations

#: clean and attacked evaluation (``train_marl.py``'s final evaluation, ``evaluate.py``)
EVALUATION = 10_000
#: the episodes a learned adversary (director) trains on against a frozen victim
ADVERSARY_TRAINING = 20_000
#: the clean episodes a budgeted attacker calibrates its step threshold on (``evaluate.py`` budgets)
BUDGET_CALIBRATION = 30_000
#: the episodes ``explain_eval.py`` explains
EXPLANATION = 424_242


def env_seed(seed: int, offset: int) -> int:
    """The env seed of a run with ``seed`` for the purpose whose offset is ``offset``."""
    return seed + offset
