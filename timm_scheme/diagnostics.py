"""What the CCA branch does in each mixer, on a batch: how much of the mixer's output it carries, and how much of
its channel attention crosses the block-diagonal groups (the information the block cannot carry itself)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Dict

import torch
from torch import nn

from .kernels.cca import same_group_mask
from .mixers import cca_in_eval, scheme_mixers
from .modes import eval_mode

DOMINANT_SHARE = 0.5  # a branch above this share of the mixer's output drowns the block it is there to help


@dataclass(frozen=True)
class CcaDiagnostics:
    """One mixer's CCA branch on a batch (in training, with the current annealed weight).

    Attributes:
        cca_weight: 1 - alpha, the branch's weight.
        cca_rms: root mean square of the weighted branch, ``(1 - alpha) * CCA``.
        block_rms: root mean square of the weighted block-diagonal MLP, ``alpha * BD_MLP(x)``.
        cca_share: ``cca_rms / (cca_rms + block_rms)``: 0 without CCA, 1 when the branch is all the output.
        cross_group_mass: mean attention weight a channel puts on channels of the other groups; (g - 1) / g for
            uniform attention, 0 for attention kept within a channel's own group.
        effective_channels: mean over channels of exp(entropy) of its attention row: 1 for a channel that only
            copies one channel, C for uniform attention.
    """
    cca_weight: float
    cca_rms: float
    block_rms: float
    cca_share: float
    cross_group_mass: float
    effective_channels: float


def _rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt())


@torch.no_grad()
def mixer_diagnostics(mixer: nn.Module, x: torch.Tensor) -> CcaDiagnostics:
    """Diagnostics of one mixer with CCA for its input ``x``, from its branches computed one by one."""
    alpha, weight = (float(w) for w in mixer.mixing_weights())
    y = mixer.bd_mlp(x)
    branch = mixer.cca(x, y)
    cca_rms, block_rms = weight * _rms(branch), alpha * _rms(y)
    attn = mixer.cca.attention(x).double()                                   # (B, C, C), rows sum to 1
    same = same_group_mask(attn.shape[-1], mixer.groups, attn.device)
    cross = float(attn.masked_fill(same, 0.0).sum(-1).mean())
    entropy = -(attn * attn.clamp_min(1e-300).log()).sum(-1)
    total = cca_rms + block_rms
    return CcaDiagnostics(cca_weight=weight, cca_rms=cca_rms, block_rms=block_rms,
                          cca_share=cca_rms / total if total > 0 else 0.0, cross_group_mass=cross,
                          effective_channels=float(entropy.exp().mean()))


@torch.no_grad()
def cca_diagnostics(model: nn.Module, *args: Any, warn: bool = True, **kwargs: Any) -> Dict[str, CcaDiagnostics]:
    """Per mixer with a CCA branch, what it does on ``model(*args, **kwargs)``: {layer name: CcaDiagnostics}.

    The model runs in eval mode (no dropout) with CCA applied as in training, then returns to its mode. Warns,
    naming the layers, where the branch carries more than half of a mixer's output (``DOMINANT_SHARE``).
    """
    mixers = {name: m for name, m in scheme_mixers(model).items() if m.has_cca}
    if not mixers:
        return {}
    inputs: Dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, a, name=name: inputs.__setitem__(name, a[0]))
               for name, m in mixers.items()]
    try:
        with eval_mode(model), cca_in_eval(model):
            model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    with eval_mode(model):
        report = {name: mixer_diagnostics(mixers[name], x) for name, x in inputs.items()}
    loud = {n: d.cca_share for n, d in report.items() if d.cca_share > DOMINANT_SHARE}
    if warn and loud:
        shown = ", ".join(f"{n} ({s:.2f})" for n, s in list(loud.items())[:6])
        warnings.warn(
            f"cca_diagnostics: the CCA branch carries more than {DOMINANT_SHARE:.0%} of the output of "
            f"{len(loud)} mixer(s): {shown}; it drowns the block-diagonal MLP it is there to help (cca_form='output' "
            f"or 'output_cross' keep it at the block's scale, a larger alpha_init starts it smaller)", stacklevel=3)
    return report


def summarize(report: Dict[str, CcaDiagnostics]) -> str:
    """One log line: the means over layers, and the largest share."""
    if not report:
        return "no CCA branch"
    values = list(report.values())
    mean = lambda key: sum(getattr(d, key) for d in values) / len(values)  # noqa: E731
    loudest = max(report, key=lambda n: report[n].cca_share)
    return (f"CCA over {len(values)} mixers: weight {mean('cca_weight'):.3f}, share {mean('cca_share'):.3f} "
            f"(largest {report[loudest].cca_share:.3f}, {loudest}), cross-group mass {mean('cross_group_mass'):.3f}, "
            f"effective channels {mean('effective_channels'):.1f}")


__all__ = ["CcaDiagnostics", "cca_diagnostics", "mixer_diagnostics", "summarize", "DOMINANT_SHARE"]
