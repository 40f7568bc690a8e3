"""The gradient-masking audit flags deliberately masked backward passes and passes honest ones."""
from __future__ import annotations

import pytest
import torch

from fgmf_marl.audit import AuditConfig, audit, gradient_relative_error
from test_attacks import MaskingGate, cnn_view, rand_obs


pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 12
FAST = AuditConfig(eps=(4.0, 8.0), pgd_steps=5, more_steps=15, unbounded_steps=30, square_queries=60, max_obs=48,
                   fd_directions=2)


def _obs() -> torch.Tensor:
    return rand_obs(48, (3, SIZE, SIZE), seed=3)


def test_audit_passes_a_plain_cnn_policy(tmp_path):
    view = cnn_view(SIZE)
    report = audit(view, _obs(), FAST)
    assert report.passed, report.markdown()
    assert report.flip_rates["pgd-5"][255.0] >= 0.95
    report.write(tmp_path)
    text = (tmp_path / "audit.md").read_text()
    assert "PASS" in text and "| pgd-5 |" in text and (tmp_path / "audit.json").is_file()


def test_audit_flags_a_masked_backward():
    view = cnn_view(SIZE)
    view.extractor.gate = MaskingGate()
    report = audit(view, _obs(), FAST)
    fired = {f.name for f in report.flags if f.fired}
    assert not report.passed and "FAIL" in report.verdict
    assert {"bpda_beats_pgd", "gradient_mismatch"} <= fired
    assert "bpda-pgd-5" in report.flip_rates


def test_audit_flags_sgam_gradient_shield_but_not_plain_sgam():
    from fgmf_marl.defenses.sgam import SGAM

    x = _obs()
    for shield, expect_pass in ((False, True), (True, False)):
        torch.manual_seed(0)
        view = cnn_view(SIZE)
        view.set_gate(SGAM(3, gradient_shield=shield))
        report = audit(view, x, FAST)
        assert report.passed == expect_pass, report.markdown()
        if shield:
            assert any(f.name == "gradient_mismatch" and f.fired for f in report.flags)


def test_finite_difference_check_agrees_with_autograd_on_an_honest_network():
    view = cnn_view(SIZE)
    assert gradient_relative_error(view, _obs()[:16], directions=2) < 0.1
