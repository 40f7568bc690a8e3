"""FGMF defenses: SCOR-PIO 2.0 (training-time curvature regulariser) and SGAM (input masking layer)."""
