"""``init="dense"`` for MLP classes read through an adapter: the dense projections' hidden units assigned to
groups by the same exact assignment as timm's MLPs (``units.assign_units`` on ``units.energy_scores``),
their blocks copied, and every per-unit layer between the projections (norms, depthwise convs) following its
units. Knows adapted layouts and ``AdaptedSchemeMlp``; nothing about files.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

from ..layers import AdaptedSchemeMlp
from ..patching.adapters import AdaptedLayout, optional_submodule
from .report import LayerInit
from .units import (DenseMlpWeights, assign_units, check_convertible, diagonal_units, energy_scores, matrix,
                    original_unit_slots, total_score)


def adapted_dense_weights(spec: AdaptedLayout) -> DenseMlpWeights:
    """The dense projections of an adapted MLP as (out, in) matrices; a gated one keeps its pair (the first
    named projection, then the second)."""
    check_convertible(spec.name, [layer.weight for layer in (*spec.fc1, spec.fc2)])
    if len(spec.fc1) > 2:
        raise ValueError(f"scheme_patch(init='dense'): layer '{spec.name}' has {len(spec.fc1)} fc1 projections; "
                         "the conversion handles one, or a gated pair")
    first, second = spec.fc1[0], (spec.fc1[1] if len(spec.fc1) > 1 else None)
    return DenseMlpWeights(matrix(first.weight), None if second is None else matrix(second.weight), first.bias,
                           None if second is None else second.bias, matrix(spec.fc2.weight), spec.fc2.bias)


@torch.no_grad()
def init_adapted_from_dense(spec: AdaptedLayout, new: AdaptedSchemeMlp, assignment: str = "best") -> LayerInit:
    """Fill ``new`` (built from ``spec``) from the dense module ``spec`` reads: the kept units' blocks, their
    per-unit state, and fc2 columns of new units zero; the eval-mode mixer then computes the dense MLP with its
    projections cut to the blocks (alpha undone)."""
    weights = adapted_dense_weights(spec)
    groups, hidden_old = new.groups, weights.hidden_features
    per_group = new.hidden_features // groups
    energy = energy_scores(weights, groups)
    slots = original_unit_slots(hidden_old, new.hidden_features, groups)
    diagonal = diagonal_units(hidden_old, slots)
    units = diagonal if assignment == "diagonal" else assign_units(energy, slots)
    # new unit index of each kept original unit: group k's units fill its first slots
    places = [k * per_group + t for k, kept in enumerate(units) for t in range(len(kept))]
    sources = [u for kept in units for u in kept]
    inner = new.inner
    in_size = spec.in_features // groups
    out_size = spec.out_features // groups
    halves = [(weights.fc1_first, weights.bias1_first)]
    if weights.fc1_second is not None:
        halves.append((weights.fc1_second, weights.bias1_second))
    for path, (w1, b1) in zip(spec.adapter.fc1_paths, halves):
        layer = inner.get_submodule(path)
        for k, kept in enumerate(units):
            index = torch.tensor(kept, dtype=torch.long)
            layer.weight[k, :len(kept)] = w1[index][:, k * in_size:(k + 1) * in_size].to(layer.weight.dtype)
            if layer.bias is not None and b1 is not None:
                layer.bias[k * per_group:k * per_group + len(kept)] = b1[index].to(layer.bias.dtype)
    fc2 = inner.get_submodule(spec.adapter.fc2)
    fc2.weight.zero_()  # new units stay silent
    for k, kept in enumerate(units):
        index = torch.tensor(kept, dtype=torch.long)
        fc2.weight[k, :, :len(kept)] = weights.fc2[k * out_size:(k + 1) * out_size][:, index].to(fc2.weight.dtype)
    if fc2.bias is not None and weights.bias2 is not None:
        fc2.bias.copy_(weights.bias2)
    for path in spec.adapter.hidden:
        _follow_units(spec, path, new, hidden_old, places, sources)
    if new.has_cca:  # the eval-mode output is alpha * MLP: undo alpha in the layer ending the MLP
        new._fold(new.output_layer, 1.0 / new.mixing_weights()[0].detach())
    return LayerInit(units=[kept + [-1] * (per_group - len(kept)) for kept in units],
                     retained_energy=total_score(energy, units), diagonal_energy=total_score(energy, diagonal),
                     objective=assignment if assignment == "diagonal" else "energy")


def _follow_units(spec: AdaptedLayout, path: str, new: AdaptedSchemeMlp, hidden_old: int, places: List[int],
                  sources: List[int]) -> None:
    """Per-unit tensors (first dimension the hidden width) of the layers at ``path`` follow their units."""
    old_root = optional_submodule(spec.module, path)
    if old_root is None:
        return
    new_root = new.inner.get_submodule(path)
    old_leaves, new_leaves = dict(old_root.named_modules()), dict(new_root.named_modules())
    for leaf_name, old_leaf in old_leaves.items():
        new_leaf = new_leaves[leaf_name]
        if isinstance(old_leaf, nn.Conv2d) and 1 < old_leaf.groups < hidden_old:
            raise ValueError(
                f"scheme_patch(init='dense'): layer '{spec.name}', {path} is a grouped conv whose groups span "
                f"several hidden units ({old_leaf.groups} groups over {hidden_old}); its units cannot move "
                "alone, so init='dense' cannot convert it; use init='random'")
        pooled = isinstance(old_leaf, nn.LayerNorm) or (isinstance(old_leaf, nn.GroupNorm) and old_leaf.num_groups == 1)
        if (pooled and len(places) != hidden_old) or (isinstance(old_leaf, nn.GroupNorm) and old_leaf.num_groups > 1):
            raise ValueError(
                f"scheme_patch(init='dense'): layer '{spec.name}', {path} ({type(old_leaf).__name__}) normalises over "
                "several hidden units, whose statistics change when units move or the width changes; use "
                f"expansion=None (keep {hidden_old} units; not for GroupNorm of several groups) or init='random'")
        state = [*old_leaf.named_parameters(recurse=False), *old_leaf.named_buffers(recurse=False)]
        for attr, old_t in state:
            new_t = getattr(new_leaf, attr)
            if old_t is not None and old_t.dim() >= 1 and old_t.shape[0] == hidden_old:
                new_t[places] = old_t.detach()[sources].to(new_t.dtype)

