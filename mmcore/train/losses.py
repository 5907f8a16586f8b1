"""Training objectives as plain functions (and the two small modules that hold learnable
loss parameters).  Each one is tested against its written formula in float64
(tests/test_train_losses.py).

    cross_entropy          CE with label smoothing and class weights (torch's definition)
    info_nce               symmetric InfoNCE (CLIP) with a learnable temperature
    distillation_loss      α·τ²·KL(teacher_τ ‖ student_τ) + (1 − α)·CE(student, labels)
    multitask_loss         Σ w_i L_i (fixed weights)
    UncertaintyWeighting   Σ ½ exp(−s_i) L_i + ½ s_i, s_i = log σ_i² learnable
    FGM                    adversarial step on the embedding matrix: r = ε g / ‖g‖₂
    visual_consistency     L_vs: 1 − cos(text projection, stop-grad image embedding)
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["cross_entropy", "info_nce", "LearnableTemperature", "distillation_loss",
           "multitask_loss", "UncertaintyWeighting", "FGM", "visual_consistency"]


def cross_entropy(logits, labels, *, label_smoothing: float = 0.0, class_weights=None,
                  ignore_index: int = -100):
    """Cross-entropy with label smoothing ε and class weights w (torch's definition).

    logits (B, C), labels (B,) int.  With q_c = ε/C + (1 − ε)·[c = y_i]:
        ℓ_i = Σ_c w_c q_c (−log softmax(z_i)_c)                (w ≡ 1 without weights)
        L   = Σ_i ℓ_i / Σ_i w_{y_i}    (rows with label == ignore_index are left out)
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (B, C), got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must have shape ({logits.shape[0]},), got "
                         f"{tuple(labels.shape)}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1), got {label_smoothing}")
    w = None
    if class_weights is not None:
        w = torch.as_tensor(class_weights, dtype=logits.dtype, device=logits.device)
        if w.shape != logits.shape[1:]:
            raise ValueError(f"class_weights must have shape ({logits.shape[1]},), got "
                             f"{tuple(w.shape)}")
    return F.cross_entropy(logits, labels, weight=w, label_smoothing=label_smoothing,
                           ignore_index=ignore_index)


class LearnableTemperature(nn.Module):
    """CLIP's learnable logit scale: a scalar s with logits = exp(s)·cos; init s = log(1/τ₀),
    exp(s) clamped to `max_scale` (100 in CLIP) in the forward."""

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0):
        super().__init__()
        if not init_temperature > 0:
            raise ValueError(f"init_temperature must be > 0, got {init_temperature}")
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self.max_scale = float(max_scale)

    def forward(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.max_scale)


def info_nce(a, b, logit_scale):
    """Symmetric InfoNCE (Radford et al. 2021, CLIP): a (B, D) and b (B, D) paired row by row.

        S = exp(s) · â b̂ᵀ   (â, b̂ rows L2-normalised; exp(s) = 1/τ, a tensor: learnable)
        L = ½ [CE(S, arange B) + CE(Sᵀ, arange B)]

    logit_scale: the scale exp(s) itself (a 0-dim tensor, e.g. ``LearnableTemperature()()``)
    or a float."""
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(f"a and b must both be (B, D) with equal shapes, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    s = torch.as_tensor(logit_scale, dtype=a.dtype, device=a.device)
    logits = s * F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t()  # (B, B)
    target = torch.arange(a.shape[0], device=a.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def distillation_loss(student_logits, teacher_logits, labels=None, *, temperature: float = 2.0,
                      alpha: float = 0.5, label_smoothing: float = 0.0):
    """Knowledge distillation (Hinton et al. 2015): logits (B, C), labels (B,) or None.

        L = α · τ² · (1/B) Σ_i KL(softmax(t_i/τ) ‖ softmax(z_i/τ)) + (1 − α) · CE(z, y)

    The τ² keeps the soft term's gradient scale independent of τ.  The teacher is detached.
    labels=None (or alpha=1) gives the soft term alone."""
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(f"student_logits and teacher_logits must both be (B, C), got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    tau = float(temperature)
    log_p_s = F.log_softmax(student_logits / tau, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().to(student_logits.dtype) / tau, dim=-1)
    soft = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * tau * tau
    if labels is None or alpha == 1.0:
        if labels is None and alpha != 1.0:
            raise ValueError("alpha < 1 mixes in the hard-label loss: pass labels")
        return soft
    hard = cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    return alpha * soft + (1.0 - alpha) * hard


def _as_list(losses, what):
    if isinstance(losses, Mapping):
        return list(losses.keys()), list(losses.values())
    if isinstance(losses, (list, tuple)):
        return list(range(len(losses))), list(losses)
    raise TypeError(f"{what} must be a dict or a list of 0-dim loss tensors, got "
                    f"{type(losses).__name__}")


def multitask_loss(losses: Union[Mapping, Sequence], weights=None):
    """Fixed-weight multi-task sum L = Σ_i w_i L_i.  losses: dict name -> 0-dim tensor (weights
    a dict with the same keys) or a list (weights a list); weights None = all 1."""
    keys, vals = _as_list(losses, "losses")
    if weights is None:
        ws = [1.0] * len(vals)
    elif isinstance(weights, Mapping):
        missing = [k for k in keys if k not in weights]
        if missing:
            raise ValueError(f"weights lacks tasks {missing}")
        ws = [float(weights[k]) for k in keys]
    else:
        ws = [float(w) for w in weights]
        if len(ws) != len(vals):
            raise ValueError(f"{len(ws)} weights for {len(vals)} losses")
    return sum(w * v for w, v in zip(ws, vals))


class UncertaintyWeighting(nn.Module):
    """Homoscedastic-uncertainty task weighting (Kendall, Gal & Cipolla, CVPR 2018, eq. 7 with
    s_i = log σ_i² learned for numerical stability):

        L = Σ_i ½ exp(−s_i) · L_i + ½ s_i          (s initialised to 0: every weight ½)

    n_tasks: how many losses forward() takes (a list, or a dict in a fixed key order)."""

    def __init__(self, n_tasks: int):
        super().__init__()
        if not isinstance(n_tasks, int) or n_tasks < 1:
            raise ValueError(f"n_tasks must be a positive int, got {n_tasks!r}")
        self.log_vars = nn.Parameter(torch.zeros(n_tasks))

    def forward(self, losses):
        _, vals = _as_list(losses, "losses")
        if len(vals) != self.log_vars.numel():
            raise ValueError(f"got {len(vals)} losses for {self.log_vars.numel()} tasks")
        s = self.log_vars
        return sum(0.5 * torch.exp(-s[i]) * v + 0.5 * s[i] for i, v in enumerate(vals))


class FGM:
    """Fast Gradient Method on the embedding matrix (Miyato, Dai & Goodfellow, ICLR 2017):

        r_adv = ε · g / ‖g‖₂,   g = ∇_E L   (E the word-embedding matrix, ‖·‖₂ over all of it)

    One training step::

        fgm.begin(); loss(E).backward()            # g lands in E.grad
        fgm.attack(); loss(E + r_adv).backward()   # E holds E + r_adv meanwhile
        fgm.restore(); optimizer.step()            # E back; params got ∇L(E) + ∇L(E + r_adv)

    The embedding need not be trainable (LoRA, frozen encoder): begin() then turns its
    requires_grad on for the step and restore() turns it off and drops the gradient, so the
    frozen matrix never reaches the optimizer or a checkpoint.  Under DDP the gradient of a
    frozen matrix is averaged over the ranks before r_adv is formed."""

    def __init__(self, embedding: Union[nn.Embedding, nn.Parameter], epsilon: float = 1.0):
        w = embedding.weight if isinstance(embedding, nn.Embedding) else embedding
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            raise TypeError("embedding must be an nn.Embedding or a (V, H) parameter")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        self.weight = w
        self.epsilon = float(epsilon)
        self.frozen = not w.requires_grad
        self._backup = None

    def perturbation(self, grad) -> torch.Tensor:
        """r_adv = ε g / ‖g‖₂ (zeros when g = 0 or is not finite)."""
        n = torch.linalg.vector_norm(grad.float())
        if not torch.isfinite(n) or n == 0:
            return torch.zeros_like(grad)
        return (self.epsilon * grad.float() / n).to(grad.dtype)

    def begin(self) -> None:
        """Before the clean forward: a frozen embedding records its gradient this step."""
        if self.frozen:
            self.weight.requires_grad_(True)

    @torch.no_grad()
    def attack(self) -> None:
        """E ← E + r_adv, from E.grad of the backward just run."""
        g = self.weight.grad
        if g is None:
            raise RuntimeError("FGM.attack(): the embedding has no gradient; call begin() "
                               "before the forward and loss.backward() before attack()")
        if self.frozen and _world() > 1:  # DDP does not reduce a gradient it did not expect
            g = g.clone()
            torch.distributed.all_reduce(g)
            g /= _world()
        self._backup = self.weight.detach().clone()
        self.weight.add_(self.perturbation(g))

    @torch.no_grad()
    def restore(self) -> None:
        """E ← the saved E; a frozen embedding's gradient is dropped and it is frozen again."""
        if self._backup is None:
            raise RuntimeError("FGM.restore() without attack()")
        self.weight.copy_(self._backup)
        self._backup = None
        if self.frozen:
            self.weight.grad = None
            self.weight.requires_grad_(False)


def _world() -> int:
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


def visual_consistency(text_repr, image_embed, *, projection: Optional[nn.Module] = None,
                       mask=None):
    """L_vs, the visual-consistency term of a vision-enhanced language model: the text side's
    representation of a sample, projected into the image space, should agree in direction with
    the (frozen) embedding of the sample's paired image.

        L_vs = (1 / Σ_b m_b) Σ_b m_b · (1 − cos(P t_b, sg(v_b)))
             = (1 / Σ_b m_b) Σ_b m_b · ½ ‖ P t_b/‖P t_b‖ − v_b/‖v_b‖ ‖²

    t (B, Ht) text representation (pooled), v (B, Hv) image embedding (stop-gradient: the
    image tower is the teacher), P an optional projection Ht -> Hv (identity when None, which
    needs Ht == Hv), m (B,) 1 for samples that have an image (all by default).  This is the
    normalised-feature regression of BYOL (Grill et al., NeurIPS 2020, eq. 2:
    ‖q̄ − z̄‖² = 2 − 2·cos) used across modalities, text predicting its image's feature.
    0 when no sample has an image."""
    t = projection(text_repr) if projection is not None else text_repr
    if t.dim() != 2 or image_embed.dim() != 2 or t.shape != image_embed.shape:
        raise ValueError(f"projected text (B, H) and image_embed (B, H) must match, got "
                         f"{tuple(t.shape)} and {tuple(image_embed.shape)}")
    cos = F.cosine_similarity(t, image_embed.detach().to(t.dtype), dim=-1)  # (B,)
    if mask is None:
        return (1.0 - cos).mean()
    m = torch.as_tensor(mask, device=t.device).to(t.dtype)
    if m.shape != cos.shape:
        raise ValueError(f"mask must have shape ({t.shape[0]},), got {tuple(m.shape)}")
    return ((1.0 - cos) * m).sum() / m.sum().clamp_min(1.0)
