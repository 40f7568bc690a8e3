"""``RegularisedPPO``: SB3's PPO with extra loss terms, the one loop every defended algorithm extends.

Like sb3-contrib's ``MaskablePPO``, the algorithm subclasses SB3's ``PPO`` and overrides ``train()``;
the loop below is SB3's own (``stable_baselines3/ppo/ppo.py``, v2.x) with one addition: after the
clipped surrogate, value and entropy terms, ``_regularisers(obs01, actions)`` returns extra loss
terms that are added before the single backward pass. ``RegularisedPPO`` holds that loop once;
``fgmf_marl.agents.fgmf_ppo.FGMFPPO`` and ``fgmf_marl.agents.sappo.SAPPO`` only define their terms and declare which
defense components (``fgmf_marl.defenses.config.DEFENSES``) they train.

Each term is logged to TensorBoard on its own (``train/ppo_loss``, ``train/scorpio_loss``,
``train/scorpio_first_order``, ``train/scorpio_second_order``, ``train/sgam_keep_loss``,
``train/sgam_keep_ratio``, ``train/sgam_distill_loss``, ``train/<term>_seconds``, ...), as the mean
over the minibatches where the term ran, beside the gradient norm before clipping (``train/grad_norm``;
with ``defense.grad_clip=separate``, ``train/ppo_grad_norm`` and ``train/regulariser_grad_norm`` on the
minibatches where a regulariser ran), which says whether ``max_grad_norm`` binds.

Regularisers run on the first ``ceil(subsample * batch)`` samples of a minibatch (SB3 shuffles the
rollout buffer, so that is a uniformly random subsample and draws no random numbers) and on every
``every``-th minibatch; a dedicated generator serves any randomness they need. Global RNG streams
are therefore untouched, and with zero weights one ``train()`` gives exactly SB3 PPO's parameters.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, ClassVar

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.preprocessing import preprocess_obs
from stable_baselines3.common.utils import explained_variance
from torch import Tensor
from torch.nn import functional as F

from fgmf_marl import config as cfglib
from fgmf_marl.agents.policy_view import PolicyView
from fgmf_marl.config import ConfigError
from fgmf_marl.defenses.config import DEFENSES, DefenseConfig


class RegularisedPPO(PPO):
    """SB3 PPO whose minibatch loss gets extra terms from ``_regularisers``; the base adds none.

    :param defense: the run config's ``defense`` section (validated here, at construction).
    Every other argument is SB3 ``PPO``'s.

    ``components`` names the defense components (keys of ``DEFENSES``' values) a subclass trains;
    the kinds it accepts are derived from that, so a new defense is one ``DEFENSES`` entry plus its class.
    """

    components: ClassVar[frozenset[str]] = frozenset()
    default_kind: ClassVar[str] = "none"

    @classmethod
    def trains(cls, kind: str) -> bool:
        """True when this class trains every component of ``kind`` and ``kind`` has one (the base: ``none``)."""
        needed = DEFENSES[kind]
        return needed <= cls.components and bool(needed) == bool(cls.components)

    def __init__(self, policy: Any, env: Any, defense: DefenseConfig | None = None, **kwargs: Any) -> None:
        self.defense = defense if defense is not None else DefenseConfig(kind=self.default_kind)  # type: ignore[arg-type]
        self._check_defense()
        self._minibatch_index = 0
        super().__init__(policy, env, **kwargs)

    def _check_defense(self) -> None:
        cfglib.validate(self.defense)
        if not self.trains(self.defense.kind):
            allowed = [kind for kind in DEFENSES if self.trains(kind)]
            raise ConfigError(f"{type(self).__name__} trains defense.kind in {', '.join(allowed)}, "
                              f"got {self.defense.kind!r}")

    def _excluded_save_params(self) -> list[str]:
        return super()._excluded_save_params() + ["_view", "_scorpio", "_generator", "_term_logs"]

    def _setup_model(self) -> None:
        self._check_defense()
        super()._setup_model()
        self._install_layers()
        self._view = PolicyView(self.policy)
        self._generator = th.Generator(device=self.device)
        self._generator.manual_seed(0 if self.seed is None else int(self.seed))

    def get_state(self) -> dict[str, Any]:
        """The regularisers' random generator (subsamples, random starts), for an exact resume."""
        return {"generator": self._generator.get_state().numpy()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._generator.set_state(th.from_numpy(np.asarray(state["generator"], dtype=np.uint8)))

    def _install_layers(self) -> None:
        """Hook for network changes (SGAM) made before the optimizer sees the parameters."""

    def _rebuild_optimizer(self) -> None:
        """Recreate the policy's optimizer as SB3's ``_build`` does, now covering added modules."""
        self.policy.optimizer = self.policy.optimizer_class(self.policy.parameters(), lr=self.lr_schedule(1),
                                                            **self.policy.optimizer_kwargs)

    # -- helpers for subclasses -------------------------------------------------------------------
    def _due(self, every: int) -> bool:
        return self._minibatch_index % every == 0

    @staticmethod
    def _head(x: Tensor, fraction: float) -> Tensor:
        return x[: max(1, math.ceil(fraction * x.shape[0]))]

    def _progress(self) -> float:
        """The fraction of training done, what every regulariser's schedule reads (``Scheduled.scale``)."""
        return 1.0 - self._current_progress_remaining

    def _log_term(self, name: str, value: float | Tensor) -> None:
        self._term_logs[name].append(float(value))

    def _regularisers(self, obs01: Tensor, actions: Tensor) -> dict[str, Tensor]:
        """Extra loss terms for this minibatch (name -> weighted scalar); ``obs01`` is in [0, 1]."""
        return {}

    def _backward_clipped_apart(self, ppo_loss: Tensor, regulariser_loss: Tensor) -> None:
        """Fill ``.grad`` with clip(grad PPO) + clip(grad regularisers), each clipped to ``max_grad_norm``.

        ``defense.grad_clip=separate``: under the shared clip a regulariser gradient larger than PPO's
        scales PPO's own step down on every minibatch the regulariser runs on.
        """
        params = [p for p in self.policy.parameters() if p.requires_grad]
        regulariser_loss.backward(retain_graph=True)   # the terms may share the PPO forward's graph (SGAM)
        regulariser_norm = th.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        regulariser_grads = [p.grad for p in params]
        for param in params:
            param.grad = None   # the regularisers' gradients are kept above, not zeroed in place
        ppo_loss.backward()
        ppo_norm = th.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        for param, grad in zip(params, regulariser_grads):
            if grad is not None:
                param.grad = grad if param.grad is None else param.grad.add_(grad)
        self._log_term("ppo_grad_norm", ppo_norm)
        self._log_term("regulariser_grad_norm", regulariser_norm)

    # -- SB3's PPO.train with the regulariser terms added ------------------------------------------
    def train(self) -> None:
        """Update policy using the currently gathered rollout buffer (SB3's loop + regularisers)."""
        self.policy.set_training_mode(True)
        self._update_learning_rate(self.policy.optimizer)
        clip_range = self.clip_range(self._current_progress_remaining)  # type: ignore[operator]
        if self.clip_range_vf is not None:
            clip_range_vf = self.clip_range_vf(self._current_progress_remaining)  # type: ignore[operator]

        entropy_losses, pg_losses, value_losses, clip_fractions, ppo_losses = [], [], [], [], []
        self._term_logs: defaultdict[str, list[float]] = defaultdict(list)

        continue_training = True
        for epoch in range(self.n_epochs):
            approx_kl_divs = []
            for rollout_data in self.rollout_buffer.get(self.batch_size):
                actions = rollout_data.actions
                if isinstance(self.action_space, spaces.Discrete):
                    actions = rollout_data.actions.long().flatten()

                values, log_prob, entropy = self.policy.evaluate_actions(rollout_data.observations, actions)
                values = values.flatten()
                advantages = rollout_data.advantages
                if self.normalize_advantage and len(advantages) > 1:
                    advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)

                ratio = th.exp(log_prob - rollout_data.old_log_prob)
                policy_loss_1 = advantages * ratio
                policy_loss_2 = advantages * th.clamp(ratio, 1 - clip_range, 1 + clip_range)
                policy_loss = -th.min(policy_loss_1, policy_loss_2).mean()

                pg_losses.append(policy_loss.item())
                clip_fraction = th.mean((th.abs(ratio - 1) > clip_range).float()).item()
                clip_fractions.append(clip_fraction)

                if self.clip_range_vf is None:
                    values_pred = values
                else:
                    values_pred = rollout_data.old_values + th.clamp(
                        values - rollout_data.old_values, -clip_range_vf, clip_range_vf
                    )
                value_loss = F.mse_loss(rollout_data.returns, values_pred)
                value_losses.append(value_loss.item())

                if entropy is None:
                    entropy_loss = -th.mean(-log_prob)
                else:
                    entropy_loss = -th.mean(entropy)
                entropy_losses.append(entropy_loss.item())

                loss = policy_loss + self.ent_coef * entropy_loss + self.vf_coef * value_loss
                ppo_losses.append(loss.item())

                obs01 = preprocess_obs(rollout_data.observations, self.observation_space,
                                       normalize_images=self.policy.normalize_images)
                ppo_loss = loss
                terms = self._regularisers(obs01, actions)
                for name, term in terms.items():
                    loss = loss + term
                    self._log_term(f"{name}_loss", term.detach())
                self._minibatch_index += 1

                with th.no_grad():
                    log_ratio = log_prob - rollout_data.old_log_prob
                    approx_kl_div = th.mean((th.exp(log_ratio) - 1) - log_ratio).cpu().numpy()
                    approx_kl_divs.append(approx_kl_div)

                if self.target_kl is not None and approx_kl_div > 1.5 * self.target_kl:
                    continue_training = False
                    if self.verbose >= 1:
                        print(f"Early stopping at step {epoch} due to reaching max kl: {approx_kl_div:.2f}")
                    break

                self.policy.optimizer.zero_grad()
                if terms and self.defense.grad_clip == "separate":
                    self._backward_clipped_apart(ppo_loss, loss - ppo_loss)
                else:
                    loss.backward()
                    norm = th.nn.utils.clip_grad_norm_(self.policy.parameters(), self.max_grad_norm)
                    self._log_term("grad_norm", norm)
                self.policy.optimizer.step()

            self._n_updates += 1
            if not continue_training:
                break

        explained_var = explained_variance(self.rollout_buffer.values.flatten(), self.rollout_buffer.returns.flatten())

        self.logger.record("train/entropy_loss", np.mean(entropy_losses))
        self.logger.record("train/policy_gradient_loss", np.mean(pg_losses))
        self.logger.record("train/value_loss", np.mean(value_losses))
        self.logger.record("train/ppo_loss", np.mean(ppo_losses))
        for name, logged in self._term_logs.items():
            self.logger.record(f"train/{name}", float(np.mean(logged)))
        self.logger.record("train/approx_kl", np.mean(approx_kl_divs))
        self.logger.record("train/clip_fraction", np.mean(clip_fractions))
        self.logger.record("train/loss", loss.item())
        self.logger.record("train/explained_variance", explained_var)
        if hasattr(self.policy, "log_std"):
            self.logger.record("train/std", th.exp(self.policy.log_std).mean().item())
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        self.logger.record("train/clip_range", clip_range)
        if self.clip_range_vf is not None:
            self.logger.record("train/clip_range_vf", clip_range_vf)
