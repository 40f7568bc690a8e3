"""Attribution (explanations) for fgmf-marl policies: one interface, Captum's shape.

``method.attribute(obs01, target=actions) -> (B, H, W)``; see :mod:`fgmf_marl.attribution.base`.
"""
from fgmf_marl.attribution.base import Attribution, normalise_maps, target_score
from fgmf_marl.attribution.captum_baselines import (GradientShapMap, IntegratedGradientsMap, OcclusionMap, RandomMap,
                                                     SmoothGradMap)
from fgmf_marl.attribution.gradcam import GradCAMPlusPlus
from fgmf_marl.attribution.perturbation import PerturbationMap, PerturbationParts, SegmentPerturbation
from fgmf_marl.attribution.pgca import PGCA, PGCAResult, PGCAStage
from fgmf_marl.policy import as_target

METHODS = {
    "pgca": PGCA,
    "perturbation": PerturbationMap,
    "gradcam++": GradCAMPlusPlus,
    "ig": IntegratedGradientsMap,
    "occlusion": OcclusionMap,
    "gradientshap": GradientShapMap,
    "smoothgrad": SmoothGradMap,
    "segments": SegmentPerturbation,
    "random": RandomMap,
}

__all__ = ["Attribution", "GradCAMPlusPlus", "GradientShapMap", "IntegratedGradientsMap", "METHODS", "OcclusionMap",
           "PGCA", "PGCAResult", "PGCAStage", "PerturbationMap", "PerturbationParts", "RandomMap", "SegmentPerturbation",
           "SmoothGradMap", "as_target", "normalise_maps", "target_score"]
