"""Attribution (explanations) for fgmf-marl policies: one interface, Captum's shape.

``method.attribute(obs01, target=actions) -> (B, H, W)``; see :mod:`fgmf_marl.attribution.base`.
"""
from fgmf_marl.attribution.base import Attribution, normalise_maps, target_score
from fgmf_marl.policy import as_target
from fgmf_marl.attribution.captum_baselines import IntegratedGradientsMap, OcclusionMap
from fgmf_marl.attribution.gradcam import GradCAMPlusPlus
from fgmf_marl.attribution.perturbation import PerturbationMap, PerturbationParts
from fgmf_marl.attribution.pgca import PGCA, PGCAResult

METHODS = {
    "pgca": PGCA,
    "perturbation": PerturbationMap,
    "gradcam++": GradCAMPlusPlus,
    "ig": IntegratedGradientsMap,
    "occlusion": OcclusionMap,
}

__all__ = ["Attribution", "GradCAMPlusPlus", "IntegratedGradientsMap", "METHODS", "OcclusionMap", "PGCA",
           "PGCAResult", "PerturbationMap", "PerturbationParts", "as_target", "normalise_maps", "target_score"]
