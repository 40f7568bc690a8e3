"""Attribution (explanations) for fgmf-marl policies: one interface, Captum's shape.

``method.attribute(obs01, target=actions) -> (B, H, W)``; see :mod:`fgmf_marl.attribution.base`.
"""
from fgmf_marl.attribution.base import Attribution, as_target, normalise_maps, target_score
from fgmf_marl.attribution.gradcam import GradCAMPlusPlus

__all__ = ["Attribution", "GradCAMPlusPlus", "as_target", "normalise_maps", "target_score"]
