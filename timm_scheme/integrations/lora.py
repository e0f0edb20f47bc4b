"""PEFT LoRA on the block-diagonal projections of SCHEME mixers.

PEFT knows nn.Linear and nn.Conv2d; ``register_lora(config)`` maps ``BlockDiagonalLinear`` and
``BlockDiagonalConv1x1`` to ``BlockDiagonalLora`` through PEFT's custom-layer mechanism. The adapter is a
rank-``r`` update per group (A_k: r x in/g, B_k: out/g x r): its sum B A is block diagonal, so merging adds it
to the blocks exactly and the merged model fuses and exports like any SCHEME model. A dense rank-r update would
mostly fall outside the blocks and could not be merged. ``r`` counts per group: the adapter has
``r * (in_features + out_features)`` parameters, as a dense LoRA of rank ``r`` has, and a rank of up to
``groups * r``.

    config = register_lora(LoraConfig(r=4, target_modules=["fc1", "fc2"]))
    model = peft.get_peft_model(model, config)
    ...
    merged = model.merge_and_unload()
"""
from __future__ import annotations

import math
import warnings
from typing import Any, List, Optional

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ..layers import BlockDiagonalConv1x1, BlockDiagonalLinear

BLOCK_DIAGONAL_TYPES = (BlockDiagonalLinear, BlockDiagonalConv1x1)


def register_lora(config: LoraConfig) -> LoraConfig:
    """Let ``config`` target SCHEME's block-diagonal layers (``fc1``/``fc2`` of patched models). Returns it.
    Adapters saved with it load back with ``PeftModel.from_pretrained(model, path,
    config=register_lora(LoraConfig.from_pretrained(path)))``."""
    config._register_custom_module({kind: BlockDiagonalLora for kind in BLOCK_DIAGONAL_TYPES})
    return config


class BlockDiagonalLora(nn.Module, LoraLayer):
    """LoRA around a block-diagonal layer: A and B are block-diagonal layers of the same kind with ``r``
    units per group, so the update stays inside the blocks."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module):
        return module.in_features, module.out_features

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: LoraConfig, **kwargs: Any) -> None:
        base = self.get_base_layer()
        where = f"{type(base).__name__}(in_features={base.in_features}, out_features={base.out_features}, " \
                f"groups={base.groups})"
        if r <= 0:
            raise ValueError(f"LoRA on {where}: r={r}; expected a positive rank per group")
        unsupported = [name for name, on in (("use_dora", config.use_dora), ("lora_bias", config.lora_bias)) if on]
        init = config.init_lora_weights
        if not isinstance(init, bool) and init != "gaussian":
            unsupported.append(f"init_lora_weights={init!r}")
        if unsupported:
            raise ValueError(f"LoRA on {where}: {', '.join(unsupported)} not supported on block-diagonal layers; "
                             "plain LoRA (init_lora_weights True, False or 'gaussian') is")
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        kind, groups = type(base), base.groups
        dd = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A[adapter_name] = kind(base.in_features, groups * r, groups, bias=False, **dd)
        self.lora_B[adapter_name] = kind(groups * r, base.out_features, groups, bias=False, **dd)
        self.lora_bias[adapter_name] = False
        self.use_rslora[adapter_name] = config.use_rslora
        self.use_dora[adapter_name] = False
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
        a, b = self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight
        with torch.no_grad():
            if init is False:  # a non-zero update from the start (PEFT's convention, for tests)
                nn.init.normal_(b, std=1.0 / math.sqrt(r))
            else:  # B = 0: the adapted model starts as the base model; A as PEFT draws it for Linear
                nn.init.zeros_(b)
            if init == "gaussian":
                nn.init.normal_(a, std=1.0 / r)
            else:
                for block in a:  # each group's A like a Linear of fan-in in/g
                    nn.init.kaiming_uniform_(block, a=math.sqrt(5))
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The update in the base layer's weight layout (groups, out/g, in/g): B_k A_k per group."""
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        delta = torch.bmm(b.float(), a.float()) * self.scaling[adapter]
        return delta.to(self.get_base_layer().weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = self.get_base_layer().weight
        for name in adapter_names:
            if name not in self.lora_A:
                continue
            merged = weight.data + self.get_delta_weight(name)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging LoRA adapter {name!r} gives non-finite weights; the adapter is broken")
            weight.data = merged
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lora_A:
                weight.data -= self.get_delta_weight(name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("LoRA on block-diagonal layers: mixed-adapter batches (adapter_names=...) are not "
                             "supported; set one adapter with set_adapter")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_a, lora_b = self.lora_A[name], self.lora_B[name]
            update = lora_b(lora_a(self.lora_dropout[name](x.to(lora_a.weight.dtype))))
            result = result + (update * self.scaling[name]).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


__all__ = ["BLOCK_DIAGONAL_TYPES", "BlockDiagonalLora", "register_lora"]
