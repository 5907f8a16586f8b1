"""Each objective of mmcore.train.losses against its written formula, in float64.

The formulas are spelled out here with explicit exp / log / sums (no torch loss function), so
a change of convention in the implementation (mean vs batchmean, weights, τ², halves) fails."""
import math

import pytest
import torch
from torch import nn

from mmcore.train import losses as L

D64 = torch.float64


def _logp(z):
    """log softmax written out: z - log Σ exp z (shifted)."""
    m = z.max(-1, keepdim=True).values
    return z - m - torch.log(torch.exp(z - m).sum(-1, keepdim=True))


def _g(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("eps,weighted", [(0.0, False), (0.1, False), (0.0, True), (0.2, True)])
def test_cross_entropy_formula(eps, weighted):
    """ℓ_i = Σ_c w_c q_ic (−log p_ic), q = ε/C + (1−ε)[c = y_i]; L = Σ ℓ_i / Σ w_{y_i}."""
    g = _g(1)
    B, C = 7, 5
    z = torch.randn(B, C, generator=g, dtype=D64) * 3
    y = torch.randint(0, C, (B,), generator=g)
    w = torch.rand(C, generator=g, dtype=D64) + 0.2 if weighted else torch.ones(C, dtype=D64)
    got = L.cross_entropy(z, y, label_smoothing=eps, class_weights=w if weighted else None)
    lp = _logp(z)
    num = 0.0
    for i in range(B):
        for c in range(C):
            q = eps / C + (1 - eps) * (c == int(y[i]))
            num += float(w[c]) * q * -float(lp[i, c])
    want = num / float(w[y].sum())
    assert abs(float(got) - want) < 1e-12


def test_cross_entropy_bad_input_names_argument():
    with pytest.raises(ValueError, match="class_weights"):
        L.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), class_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="label_smoothing"):
        L.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1, 2]), label_smoothing=1.5)
    with pytest.raises(ValueError, match="labels"):
        L.cross_entropy(torch.randn(3, 4), torch.tensor([0, 1]))


def test_info_nce_formula_and_learnable_temperature():
    """L = ½ [ −(1/B) Σ_i log softmax_j(s·cos(a_i, b_j))_i − (1/B) Σ_j log softmax_i(...)_j ],
    s = exp(logit_scale) clamped to 100; the scale gets a gradient (CLIP)."""
    g = _g(2)
    B, Dm = 6, 9
    a = torch.randn(B, Dm, generator=g, dtype=D64, requires_grad=True)
    b = torch.randn(B, Dm, generator=g, dtype=D64, requires_grad=True)
    temp = L.LearnableTemperature(init_temperature=0.2)
    assert abs(float(temp().detach()) - 5.0) < 1e-5  # init: 1 / τ₀
    temp = temp.double()
    with torch.no_grad():
        temp.logit_scale.fill_(math.log(5.0))
    got = L.info_nce(a, b, temp())
    s = math.exp(float(temp.logit_scale.detach()))
    cos = torch.zeros(B, B, dtype=D64)
    for i in range(B):
        for j in range(B):
            cos[i, j] = (a[i] @ b[j]) / (a[i].norm() * b[j].norm())
    S = s * cos
    row = -sum(float(S[i, i] - torch.log(torch.exp(S[i]).sum())) for i in range(B)) / B
    col = -sum(float(S[j, j] - torch.log(torch.exp(S[:, j]).sum())) for j in range(B)) / B
    assert abs(float(got) - 0.5 * (row + col)) < 1e-12
    got.backward()
    assert temp.logit_scale.grad is not None and temp.logit_scale.grad.abs() > 0
    # d L / d logit_scale = s · dL/ds, dL/ds = ½ mean over rows/cols of (E_p[cos] − cos_ii)
    P = torch.softmax(S.detach(), 1)
    Q = torch.softmax(S.detach(), 0)
    dLds = 0.5 * (float(((P * cos.detach()).sum(1) - cos.detach().diag()).mean())
                  + float(((Q * cos.detach()).sum(0) - cos.detach().diag()).mean()))
    assert abs(float(temp.logit_scale.grad) - s * dLds) < 1e-10
    with torch.no_grad():
        temp.logit_scale.fill_(10.0)
    assert float(temp()) == 100.0  # clamped as CLIP


@pytest.mark.parametrize("tau,alpha", [(1.0, 0.5), (2.0, 0.7), (4.0, 1.0)])
def test_distillation_formula(tau, alpha):
    """L = α τ² (1/B) Σ_i Σ_c p^T_ic (log p^T_ic − log p^S_ic) + (1 − α) CE(z^S, y),
    p^X = softmax(z^X / τ); no gradient to the teacher."""
    g = _g(3)
    B, C = 5, 4
    zs = torch.randn(B, C, generator=g, dtype=D64, requires_grad=True)
    zt = torch.randn(B, C, generator=g, dtype=D64, requires_grad=True)
    y = torch.randint(0, C, (B,), generator=g)
    got = L.distillation_loss(zs, zt, y, temperature=tau, alpha=alpha)
    ls, lt = _logp(zs.detach() / tau), _logp(zt.detach() / tau)
    kl = float((torch.exp(lt) * (lt - ls)).sum()) / B
    ce = -float(_logp(zs.detach())[torch.arange(B), y].mean())
    want = alpha * tau * tau * kl + (1 - alpha) * ce
    assert abs(float(got) - want) < 1e-12
    got.backward()
    assert zt.grad is None and zs.grad is not None


def test_distillation_needs_labels_when_mixing():
    with pytest.raises(ValueError, match="labels"):
        L.distillation_loss(torch.randn(2, 3), torch.randn(2, 3), None, alpha=0.5)


def test_multitask_fixed_weights():
    l1, l2, l3 = (torch.tensor(v, dtype=D64) for v in (0.3, 1.7, 2.5))
    assert float(L.multitask_loss({"a": l1, "b": l2}, {"a": 2.0, "b": 0.5})) == \
        pytest.approx(2.0 * 0.3 + 0.5 * 1.7, abs=1e-15)
    assert float(L.multitask_loss([l1, l2, l3])) == pytest.approx(4.5, abs=1e-15)
    with pytest.raises(ValueError, match="weights"):
        L.multitask_loss({"a": l1, "b": l2}, {"a": 1.0})


def test_uncertainty_weighting_formula_and_optimum():
    """L = Σ_i ½ exp(−s_i) L_i + ½ s_i;  ∂L/∂s_i = ½ − ½ exp(−s_i) L_i, zero at s_i = log L_i."""
    uw = L.UncertaintyWeighting(3).double()
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([0.0, -0.5, 1.2], dtype=D64))
    ls = [torch.tensor(v, dtype=D64) for v in (0.8, 2.0, 0.1)]
    got = uw(ls)
    s = uw.log_vars.detach()
    want = sum(0.5 * math.exp(-float(s[i])) * float(ls[i]) + 0.5 * float(s[i]) for i in range(3))
    assert abs(float(got) - want) < 1e-12
    got.backward()
    for i in range(3):
        assert abs(float(uw.log_vars.grad[i]) - (0.5 - 0.5 * math.exp(-float(s[i])) *
                                                  float(ls[i]))) < 1e-12
    opt = torch.optim.SGD(uw.parameters(), lr=0.5)
    for _ in range(400):
        opt.zero_grad()
        uw(ls).backward()
        opt.step()
    assert torch.allclose(uw.log_vars.detach(), torch.log(torch.stack(ls)), atol=1e-6)


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4)
        self.lin = nn.Linear(4, 3)

    def forward(self, ids):
        return self.lin(torch.tanh(self.emb(ids)).mean(1))


@pytest.mark.parametrize("frozen", [False, True])
def test_fgm_formula(frozen):
    """Parameters get ∇L(E) + ∇L(E + r), r = ε g / ‖g‖₂, g = ∇_E L(E); E is restored; a frozen
    embedding ends frozen with no gradient."""
    torch.manual_seed(0)
    m = _Tiny().double()
    m.emb.weight.requires_grad_(not frozen)
    ids = torch.randint(0, 11, (5, 6))
    y = torch.randint(0, 3, (5,))
    E0 = m.emb.weight.detach().clone()
    eps = 0.7

    def loss_at(E):
        h = torch.tanh(nn.functional.embedding(ids, E)).mean(1)
        return nn.functional.cross_entropy(m.lin(h), y)

    # the formula, with explicit autograd on a copy
    E = E0.clone().requires_grad_(True)
    gE = torch.autograd.grad(loss_at(E), E)[0]
    r = eps * gE / torch.sqrt((gE * gE).sum())
    W, b = m.lin.weight, m.lin.bias
    want = [sum(t) for t in zip(torch.autograd.grad(loss_at(E0), (W, b)),
                                torch.autograd.grad(loss_at(E0 + r), (W, b)))]
    fgm = L.FGM(m.emb, epsilon=eps)
    fgm.begin()
    nn.functional.cross_entropy(m(ids), y).backward()
    fgm.attack()
    assert torch.allclose(m.emb.weight.detach(), E0 + r, atol=1e-14)
    nn.functional.cross_entropy(m(ids), y).backward()
    fgm.restore()
    assert torch.equal(m.emb.weight.detach(), E0)
    assert torch.allclose(W.grad, want[0], atol=1e-13)
    assert torch.allclose(b.grad, want[1], atol=1e-13)
    if frozen:
        assert m.emb.weight.grad is None and not m.emb.weight.requires_grad


def test_visual_consistency_formula():
    """L_vs = Σ_b m_b (1 − cos(P t_b, v_b)) / Σ_b m_b = the mean of ½‖P t̂ − v̂‖²; the image
    side gets no gradient."""
    g = _g(5)
    t = torch.randn(4, 6, generator=g, dtype=D64, requires_grad=True)
    v = torch.randn(4, 5, generator=g, dtype=D64, requires_grad=True)
    P = nn.Linear(6, 5).double()
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=D64)
    got = L.visual_consistency(t, v, projection=P, mask=mask)
    pt = P(t).detach()
    terms = []
    for i in range(4):
        a, c = pt[i] / pt[i].norm(), v[i].detach() / v[i].detach().norm()
        terms.append(0.5 * float(((a - c) ** 2).sum()))
    want = (terms[0] + terms[2] + terms[3]) / 3
    assert abs(float(got) - want) < 1e-12
    got.backward()
    assert v.grad is None and t.grad is not None
    assert float(L.visual_consistency(t, v, projection=P, mask=torch.zeros(4))) == 0.0
    with pytest.raises(ValueError, match="image_embed"):
        L.visual_consistency(t, v)  # 6 != 5 without a projection
