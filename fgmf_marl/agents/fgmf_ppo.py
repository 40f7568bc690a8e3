"""FGMF-PPO: PPO with the SCOR-PIO 2.0 regulariser and the SGAM masking layer (docs/DESIGN.md, "FGMF").

The PPO loop and the logging of each term are :class:`fgmf_marl.agents.regularised_ppo.RegularisedPPO`'s; this
class adds the two components' terms. Each is logged to TensorBoard on its own
(``train/scorpio_loss``, ``train/scorpio_first_order``, ``train/scorpio_second_order``,
``train/scorpio_descent_share``, ``train/sgam_keep_loss``, ``train/sgam_keep_ratio``, ``train/sgam_distill_loss``,
``train/<term>_seconds``, ...), as the mean over the minibatches where the term ran.
"""
from __future__ import annotations

import time
from typing import ClassVar

from torch import Tensor

from fgmf_marl.agents.policy_view import PolicyView
from fgmf_marl.agents.regularised_ppo import RegularisedPPO
from fgmf_marl.defenses.scorpio import ScorpioRegulariser
from fgmf_marl.defenses.sgam import SGAM, distillation_loss, gradcam_teacher, keep_ratio_loss


class FGMFPPO(RegularisedPPO):
    """PPO with FGMF: SCOR-PIO 2.0 (``defense.kind`` scorpio|fgmf) and SGAM (sgam|fgmf).

    With SGAM the policy's input gate (``PolicyView.gate``) is an ``SGAM`` layer (built in ``_setup_model``,
    so ``FGMFPPO.load`` rebuilds it before the weights are loaded); its keep-ratio prior runs on
    every minibatch (it is one pass of a tiny conv net), its Grad-CAM++ distillation on a subsample
    of every ``distill_every``-th minibatch.
    """

    components: ClassVar[frozenset[str]] = frozenset({"scorpio", "sgam"})
    default_kind: ClassVar[str] = "fgmf"

    def _install_layers(self) -> None:
        if self.defense.uses("sgam"):
            channels = int(self.observation_space.shape[0])
            PolicyView(self.policy).set_gate(SGAM.from_config(self.defense.sgam, channels).to(self.device))
            self._rebuild_optimizer()
        self._scorpio = ScorpioRegulariser.from_config(self.defense.scorpio) if self.defense.uses("scorpio") else None

    @property
    def gate(self) -> SGAM | None:
        gate = self.policy.features_extractor.gate
        return gate if isinstance(gate, SGAM) else None

    def _regularisers(self, obs01: Tensor, actions: Tensor) -> dict[str, Tensor]:
        terms: dict[str, Tensor] = {}
        cfg = self.defense
        gate = self.gate
        # The keep map of the PPO loss's forward on this minibatch; taken before SCOR-PIO's passes run.
        keep = gate.pop_training_keep() if gate is not None else None
        eps = 0.0 if self._scorpio is None else self._scorpio.eps * cfg.scorpio.scale(self._progress())
        if eps > 0 and self._due(cfg.scorpio.every):
            start = time.perf_counter()
            out = self._scorpio(self._view, self._head(obs01, cfg.scorpio.subsample), eps=eps)
            terms["scorpio"] = out.loss
            self._log_term("scorpio_first_order", out.first_order)
            self._log_term("scorpio_second_order", out.second_order)
            self._log_term("scorpio_descent_share", out.descent_share)
            self._log_term("scorpio_seconds", time.perf_counter() - start)
        if gate is not None:
            start = time.perf_counter()
            if keep is None:
                raise RuntimeError("SGAM stored no keep map: the PPO loss's forward must run in training mode")
            self._log_term("sgam_keep_ratio", keep.detach().mean())
            aux = cfg.sgam.scale(self._progress())
            self._log_term("sgam_aux_scale", aux)
            if cfg.sgam.keep_coef > 0 and aux > 0:
                terms["sgam_keep"] = aux * cfg.sgam.keep_coef * keep_ratio_loss(keep, cfg.sgam.rho)
            if cfg.sgam.distill_coef > 0 and aux > 0 and self._due(cfg.sgam.distill_every):
                sub = self._head(obs01, cfg.sgam.distill_subsample)
                size = tuple(gate.saliency(sub[:1]).shape[-2:])
                teacher = gradcam_teacher(self._view, sub, actions[: sub.shape[0]], size)
                terms["sgam_distill"] = aux * cfg.sgam.distill_coef * distillation_loss(gate, sub, teacher)
            self._log_term("sgam_seconds", time.perf_counter() - start)
        return terms
