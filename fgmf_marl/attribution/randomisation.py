"""The model-parameter randomisation test (MPRT, Adebayo et al. 2018), cascading from the logits down, run by Quantus.

The sanity check of an explanation method: re-initialise the actor's layers one at a time, from the logits
toward the input, each on top of those above it, and compare the method's maps for the same target actions
with the trained model's. A method that explains the model gives maps that fall away from the trained ones;
one that ignores the model (an edge detector, a model-free segment mask, a seeded random map) does not.

Quantus (Hedström et al. 2023), the field's reference implementation, runs the cascade
(``quantus.MPRT(layer_order="top_down")``): it re-initialises every module that has ``reset_parameters``
(PyTorch's default initialisation, the global generator seeded with ``seed + 1`` before each layer) in
reverse ``named_modules()`` order, on a deep copy of the model, and compares each stage's maps with the given
ones by Spearman rank correlation (average ranks on ties; ``nan`` for a constant map), after ``abs`` and a
division by the batch's largest value, neither of which changes the ranks of our non-negative maps.
:class:`ActorPath` is the model we give it: the actor of a :class:`~fgmf_marl.policy.PolicyLike` (obs ->
action logits) as an ``nn.Module`` whose modules are the actor's layers only, registered input to output,
so that reverse order is the logits down and the critic and the input gate are never touched.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import quantus
import torch
from torch import Tensor, nn

from fgmf_marl.attribution.base import Attribution
from fgmf_marl.policy import PolicyLike, TargetLike, as_target

#: the key of Quantus' first score: the trained model's maps recomputed against the given ones (1 for a
#: deterministic method), the reference each layer's similarity falls from
RECOMPUTED = "original"


class ActorPath(nn.Module):
    """The actor of ``view`` as a model for Quantus: ``forward(obs)`` = ``view(obs)``, the action logits, and
    ``named_modules()`` = the layers of ``view.actor_layers()``, input to output (names with ``/`` for ``.``;
    :meth:`layer_name` maps Quantus' names back to the view's).

    ``view`` is held but not registered, so nothing off the actor path (critic, input gate) is re-initialised;
    a deep copy (Quantus randomises one) copies ``view`` and the registered layers together, so the copy's
    ``view`` computes with the copy's re-initialised layers. Raises ValueError when an actor parameter has no
    ``reset_parameters`` of its own module to re-initialise it (a ViT's learned positions, the fused input
    projection of ``nn.MultiheadAttention``): MPRT would leave it trained and still call the model random.
    """

    def __init__(self, view: PolicyLike) -> None:
        super().__init__()
        object.__setattr__(self, "view", view)   # not a submodule: only the actor layers are randomised
        self.names: dict[str, str] = {}
        kept: list[str] = []
        for name, module in view.actor_layers():
            if name.endswith(".params"):      # a module's own parameters: no layer of their own to reset
                kept += [f"{name.removesuffix('.params')}.{n}" for n, _ in module.named_parameters(recurse=False)]
                continue
            key = name.replace(".", "/")
            self.add_module(key, module)
            self.names[key] = name
        resettable = {id(p) for m in self.modules() if hasattr(m, "reset_parameters")
                      for p in m.parameters(recurse=False)}
        kept += [self.layer_name(n) for n, p in self.named_parameters() if id(p) not in resettable]
        if kept:
            raise ValueError("Quantus' MPRT re-initialises only modules with reset_parameters; these actor "
                             f"parameters have none and would stay trained: {', '.join(kept)}")

    def forward(self, obs: Tensor) -> Tensor:
        """Action logits (B, n_actions)."""
        return self.view(obs)

    def layer_name(self, name: str) -> str:
        """The view's dotted name of a module or parameter named ``name`` inside this adapter."""
        key, dot, rest = name.partition(".")
        return self.names[key] + dot + rest


@dataclass
class Randomisation:
    """One method's cascade on one batch of B observations."""

    layers: list[str]                  # the re-initialised layers in cascade order (logits first), view's names
    similarity: dict[str, np.ndarray]  # RECOMPUTED, then each layer: Spearman (B,) of the maps with the trained
    #                                    model's once that layer and all above it are re-initialised; nan if constant
    original: Tensor                   # (B, H, W) the trained model's maps
    randomised: Tensor                 # (B, H, W) the maps once the whole actor is re-initialised


def model_randomisation(method_factory: Callable[[PolicyLike], Attribution], view: PolicyLike, obs: Tensor,
                        target: TargetLike, *, seed: int = 0) -> Randomisation:
    """Quantus' cascading MPRT of the method ``method_factory`` builds, on ``view``'s actor (:class:`ActorPath`).

    Each stage rebuilds the method on the randomised copy's view, so every method, ours or Captum's, is
    tested through its own ``attribute(inputs, target=...)``; the same ``target`` actions are explained at
    every stage. ``view`` and the global random stream are left as they were (Quantus reseeds the stream).
    Why Quantus and not our own loop: the reference implementation is the definition readers know.
    """
    target = as_target(target, obs.shape[0], obs.device)
    actor = ActorPath(view)
    original = method_factory(view).attribute(obs, target=target).detach()
    latest: list[Tensor] = []

    def explain_func(model: ActorPath, inputs: np.ndarray, targets: np.ndarray, **_: Any) -> np.ndarray:
        maps = method_factory(model.view).attribute(torch.as_tensor(inputs, device=obs.device),
                                                    target=torch.as_tensor(targets, device=obs.device)).detach()
        latest[:] = [maps]      # Quantus explains the stages in cascade order: the last call is the full cascade
        return maps.cpu().numpy()

    metric = quantus.MPRT(layer_order="top_down", seed=seed, return_aggregate=False, disable_warnings=True)
    with torch.random.fork_rng(), warnings.catch_warnings():
        warnings.simplefilter("ignore")   # scipy's constant-input warning: that sample's similarity is nan
        scores = metric(model=actor, x_batch=obs.detach().cpu().numpy(), y_batch=target.cpu().numpy(),
                        a_batch=original.cpu().numpy(), explain_func=explain_func, channel_first=True,
                        batch_size=obs.shape[0])
    similarity = {(k if k == RECOMPUTED else actor.layer_name(k)): np.asarray(v, dtype=float) for k, v in scores.items()}
    return Randomisation(layers=[k for k in similarity if k != RECOMPUTED], similarity=similarity,
                         original=original, randomised=latest[0])
