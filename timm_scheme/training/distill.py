"""Fine-tune a converted SCHEME model with its dense original as teacher.

    distiller = Distiller(teacher=dense_model, student=scheme_model, block_weight=1.0)
    logits, distill_loss = distiller(images)
    loss = F.cross_entropy(logits, targets) + distill_loss
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..mixers import scheme_mixers


class Distiller(nn.Module):
    """ Runs teacher (frozen, eval, no grad) and student on the same images; returns the student's logits
    and ``logit_weight * KL(teacher || student) * T^2 + block_weight * mean relative block error``, where the
    block error compares each SCHEME mixer's output with the teacher's MLP of the same name.
    """
    def __init__(self, teacher: nn.Module, student: nn.Module, *, temperature: float = 2.0,
                 logit_weight: float = 1.0, block_weight: float = 0.0):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"Distiller: temperature={temperature!r}; expected a number > 0 (e.g. 2)")
        for name, value in (("logit_weight", logit_weight), ("block_weight", block_weight)):
            if not value >= 0:
                raise ValueError(f"Distiller: {name}={value!r}; expected a number >= 0")
        if logit_weight == 0 and block_weight == 0:
            raise ValueError("Distiller: logit_weight and block_weight are both 0; nothing to distil")
        self.student = student
        self.teacher = [teacher]  # a list keeps the teacher out of this module's parameters and state_dict
        teacher.requires_grad_(False)
        self.temperature, self.logit_weight, self.block_weight = temperature, logit_weight, block_weight
        self.layers = list(scheme_mixers(student))
        self._outputs: Dict[str, Dict[str, torch.Tensor]] = {"teacher": {}, "student": {}}
        self._hooks: List[torch.utils.hooks.RemovableHandle] = []
        if block_weight > 0:
            self._hook_blocks(teacher, student)

    def _hook_blocks(self, teacher: nn.Module, student: nn.Module) -> None:
        if not self.layers:
            raise ValueError(f"Distiller: the student {type(student).__name__} has no SCHEME mixer; "
                             "block distillation needs a scheme_patch'ed student")
        teacher_modules = dict(teacher.named_modules())
        missing = [name for name in self.layers if name not in teacher_modules]
        if missing:
            raise ValueError(f"Distiller: the teacher has no module named {missing[:3]}; the teacher must be the "
                             "model the student was patched from (same module names)")
        student_modules = dict(student.named_modules())
        for role, modules in (("teacher", teacher_modules), ("student", student_modules)):
            for name in self.layers:
                store = self._outputs[role]
                self._hooks.append(modules[name].register_forward_hook(
                    lambda mod, args, out, name=name, store=store: store.__setitem__(name, out)))

    def forward(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        teacher = self.teacher[0]
        teacher.eval()
        try:
            with torch.no_grad():
                teacher_logits = teacher(images)
            student_logits = self.student(images)
            loss = student_logits.new_zeros((), dtype=torch.float32)
            if self.logit_weight > 0:
                loss = loss + self.logit_weight * self._logit_loss(student_logits, teacher_logits)
            if self.block_weight > 0:
                loss = loss + self.block_weight * self._block_loss()
        finally:
            for store in self._outputs.values():
                store.clear()
        return student_logits, loss

    def _logit_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        return F.kl_div(F.log_softmax(student.float() / t, -1), F.log_softmax(teacher.float() / t, -1),
                        reduction="batchmean", log_target=True) * t * t

    def _block_loss(self) -> torch.Tensor:
        errors = []
        for name in self.layers:
            s, t = self._outputs["student"][name].float(), self._outputs["teacher"][name].float()
            errors.append((s - t).pow(2).mean() / t.pow(2).mean().clamp_min(1e-12))
        return torch.stack(errors).mean()

    def remove(self) -> None:
        """Detach the hooks from teacher and student."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
