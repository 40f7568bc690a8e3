"""The gradient-masking audit flags deliberately masked backward passes and passes honest ones."""
from __future__ import annotations

import pytest
import torch

from fgmf_marl.audit import AuditConfig, AuditReport, _flags, audit, gradient_relative_error
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


def _dead_view():
    """A policy whose logits ignore the input: the action head keeps only its bias."""
    view = cnn_view(SIZE)
    with torch.no_grad():
        view.policy.action_net.weight.zero_()
        view.policy.action_net.bias.copy_(torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]))
    return view


def test_a_policy_no_attack_can_flip_is_uninformative_not_pass(tmp_path):
    report = audit(_dead_view(), _obs(), FAST)
    assert not report.passed and report.verdict.startswith("UNINFORMATIVE")
    assert all(r == 0.0 for rates in report.flip_rates.values() for r in rates.values())
    assert report.flip_rates["random"][255.0] == 0.0          # random images at eps=1 were tried too
    dead = next(f for f in report.flags if f.name == "no_attack_flips")
    assert dead.fired and "highest flip rate 0.000" in dead.evidence and "threshold 0.05" in dead.evidence
    growth = next(f for f in report.flags if f.name == "no_growth_with_budget")
    assert "grows" not in growth.evidence and "flat" in growth.evidence   # no growth claimed over a zero table
    report.write(tmp_path)
    assert "UNINFORMATIVE" in (tmp_path / "audit.md").read_text()


def test_evidence_states_numbers_and_tolerance_and_says_within_tolerance():
    cfg = AuditConfig(eps=(2.0, 4.0), pgd_steps=10, more_steps=50, tolerance=0.02)
    pgd = {2.0: 0.5, 4.0: 0.727, 255.0: 1.0}
    rates = {"random": {2.0: 0.0, 4.0: 0.0, 255.0: 0.3}, "fgsm": {2.0: 0.4, 4.0: 0.6}, "pgd-10": pgd,
             "pgd-50": {2.0: 0.55, 4.0: 0.72}, "square": {2.0: 0.3, 4.0: 0.5}, "bpda-pgd-10": {2.0: 0.5, 4.0: 0.734}}
    flags = {f.name: f for f in _flags(rates, [2.0, 4.0], cfg, gated=True, transfer=False, rel_err=0.01)}
    bpda = flags["bpda_beats_pgd"]
    assert not bpda.fired
    assert bpda.evidence == ("BPDA-PGD-10 <= PGD-10 at every eps (tolerance 0.02): 2/255: 0.500 vs 0.500; "
                             "4/255: 0.734 vs 0.727; BPDA-PGD-10 higher at 4/255, within tolerance")
    growth = flags["no_growth_with_budget"]
    assert not growth.fired and "grows with eps" in growth.evidence and "4/255 0.727" in growth.evidence
    assert "dips within tolerance: PGD-50 at 4/255" in growth.evidence
    rates["bpda-pgd-10"][4.0] = 0.8                           # beyond the tolerance: flagged, numbers shown
    fired = {f.name: f for f in _flags(rates, [2.0, 4.0], cfg, gated=True, transfer=False, rel_err=0.01)}
    assert fired["bpda_beats_pgd"].fired
    assert "by more than the tolerance 0.02 at 4/255 (2/255: 0.500 vs 0.500; 4/255: 0.800 vs 0.727)" in \
        fired["bpda_beats_pgd"].evidence


def test_a_pass_over_zero_bounded_flip_rates_says_so():
    cfg = AuditConfig(eps=(4.0, 8.0), pgd_steps=10, more_steps=50)
    zero = {4.0: 0.0, 8.0: 0.0}
    rates = {"random": {**zero, 255.0: 0.0}, "fgsm": dict(zero), "pgd-10": {**zero, 255.0: 1.0}, "pgd-50": dict(zero),
             "square": dict(zero)}
    report = AuditReport(rates, _flags(rates, [4.0, 8.0], cfg, gated=False, transfer=False, rel_err=0.01), 64, 0.01, cfg)
    assert report.passed
    assert report.verdict.endswith("but no attack flips the policy at eps <= 8/255 (highest 0.000, threshold 0.05): "
                                   "only eps=1 and the gradient check tested it")
