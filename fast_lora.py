"""The fast LoRA training step: the numerics behind fine_tune_sentiment.py's FAST_STEP, kept out of the story.

Two rewrites of a peft LoRA model's training step that cut its time on a CPU (bench/lora_step.py); the model, the
loss and the dropout rate stay what they were:
- every dropout (peft's on each LoRA input, and the encoder's own) draws its mask from 16 random bits an element
  instead of torch's bernoulli_ (p rounded to 1/65536); layers that read the same tensor (query, key and value)
  share its mask, as one dropout of their common input;
- each LoRA layer (fp32, or under autocast) adds its x A^T B^T * scale in one autograd function: the scale is
  applied to the rank-r product, the sum is one addmm, and the weight gradients are taken in the orientation CPU
  matmuls are fast at; under autocast its products run in autocast's dtype, as peft's would.

The masks are another draw of the same rate; the LoRA layers compute peft's sums in another order (tested against
peft's outputs and gradients, in fp32 and under bf16 autocast). The saved adapter is plain peft. For DoRA, LoRA
biases, fan-in-fan-out layers and weights loaded in a low precision, peft's own forward runs. The fused layer plugs
into peft's LoraVariant hook, which peft calls private: where the hook is not what this file expects, apply() warns
once and leaves peft's step in place.

    import fast_lora
    fast_lora.apply(peft_model)  # True: the fused LoRA layers are in use
"""

from __future__ import annotations

import functools
import inspect
import logging
import weakref

import torch
from peft.tuners.lora import LoraLayer
from peft.tuners.lora.layer import Linear as LoraLinear

try:
    from peft.tuners.lora.layer import LoraVariant
except ImportError:  # a peft without the hook: hook_is_usable() says so, apply() keeps peft's step
    LoraVariant = object

HOOK = ("init", "merge_safe", "merge_unsafe", "unmerge", "forward")  # the LoraVariant methods peft calls
FORWARD_ARGS = ["module", "active_adapter", "x", "result", "kwargs"]  # how peft calls LoraVariant.forward
log = logging.getLogger("sentiment")


def apply(model) -> bool:
    """Swap model's dropouts for the cheap one and, where peft's hook allows, fuse its fp32 LoRA layers; return
    whether the fused layers are in use."""
    shared = {}
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        for name, old in layer.lora_dropout.items():
            if isinstance(old, torch.nn.Dropout) and 0 < old.p < 1:
                layer.lora_dropout[name] = Dropout(old.p, shared)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is torch.nn.Dropout and 0 < child.p < 1:
                setattr(module, name, Dropout(child.p, None))  # the encoder's own: attention reads its .p only
    if not hook_is_usable(layers):
        warn_once("warning: peft's LoraVariant hook is not what fast_lora.py expects (a newer peft?); training "
                  "with peft's own LoRA step (slower on a CPU, same results)")
        return False
    fused = [layer for layer in layers if type(layer) is LoraLinear and not layer.fan_in_fan_out]
    for layer in fused:
        layer.lora_variant.update({name: FusedLora() for name in layer.lora_A if name not in layer.lora_variant
                                   and not layer.lora_bias[name]})
    return bool(fused)


def hook_is_usable(layers: list) -> bool:
    """True where peft's LoraVariant has the methods and forward signature FusedLora implements, and its layers
    keep their variants in a lora_variant dict."""
    if not all(callable(getattr(LoraVariant, name, None)) for name in HOOK):
        return False
    if list(inspect.signature(LoraVariant.forward).parameters) != FORWARD_ARGS:
        return False
    return all(isinstance(getattr(layer, "lora_variant", None), dict) for layer in layers)


@functools.cache
def warn_once(message: str) -> None:
    """Log message the first time it is given."""
    log.warning(message)


class Dropout(torch.nn.Module):
    """Dropout with masks from 16 random bits an element; with `last` (a dict shared by the LoRA layers), layers
    that read the same input tensor use the same mask."""

    def __init__(self, p: float, last: dict | None):
        super().__init__()
        self.p, self.last = p, last

    def forward(self, x):
        if not self.training:
            return x
        if self.last is None or self.last.get("input", lambda: None)() is not x:
            bits = torch.randint(-2**63, 2**63 - 1, (-(-x.numel() // 4),), dtype=torch.int64, device=x.device)
            threshold = round(self.p * 65536)
            keep = bits.view(torch.int16)[:x.numel()].view(x.shape) >= threshold - 32768
            mask = keep.to(x.dtype).mul_(65536 / (65536 - threshold))
            if self.last is None:
                return x * mask
            self.last.update(input=weakref.ref(x), mask=mask)  # weak: the step's tensors are freed as usual
        return x * self.last["mask"]


class LoraProduct(torch.autograd.Function):
    """result + (x A^T * scale) B^T, with both weight gradients as grad^T @ input (fast on CPU matmuls). Under
    autocast its products run in autocast's dtype (bf16, fp16), as autocast would run peft's Linear layers: inputs
    and weights cast down once, the weight gradients handed back in the weights' own dtype."""

    @staticmethod
    def forward(ctx, x, result, a, b, scale):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else result.dtype
        with torch.autocast(device, enabled=False):  # the casts are ours, made once
            x2, a_, b_ = x.reshape(-1, x.shape[-1]).to(dtype), a.to(dtype), b.to(dtype)
            low = (x2 @ a_.t()).mul_(scale)
            found = torch.addmm(result.reshape(-1, result.shape[-1]).to(dtype), low, b_.t()).view(result.shape)
        ctx.save_for_backward(x2, low, a_, b_)
        ctx.scale, ctx.shape, ctx.dtypes = scale, x.shape, (x.dtype, result.dtype, a.dtype, b.dtype)
        return found

    @staticmethod
    def backward(ctx, grad):
        x2, low, a, b = ctx.saved_tensors
        x_dtype, result_dtype, a_dtype, b_dtype = ctx.dtypes
        with torch.autocast(grad.device.type, enabled=False):
            grad2 = grad.reshape(-1, grad.shape[-1]).to(low.dtype)
            grad_low = (grad2 @ b).mul_(ctx.scale)
            grad_x = (grad_low @ a).view(ctx.shape).to(x_dtype) if ctx.needs_input_grad[0] else None
            return (grad_x, grad.to(result_dtype), (grad_low.t() @ x2).to(a_dtype),
                    (low.t() @ grad2).t().to(b_dtype), None)


class FusedLora(LoraVariant):
    """A LoRA variant that is vanilla LoRA computed by LoraProduct; merging uses peft's own delta weight."""

    @staticmethod
    def init(module, adapter_name, **kwargs):
        pass

    @staticmethod
    def merge_safe(module, active_adapter, orig_weight):
        return orig_weight + module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter, orig_weight):
        orig_weight.data += module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter, orig_weight):
        return orig_weight - module.get_delta_weight(active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module, active_adapter, x, result, **kwargs):
        a, b = module.lora_A[active_adapter], module.lora_B[active_adapter]
        dropped, scale = module.lora_dropout[active_adapter](x), module.scaling[active_adapter]
        autocast = torch.is_autocast_enabled(x.device.type)
        if not autocast and not x.dtype == a.weight.dtype == result.dtype:
            return result + b(a(dropped)) * scale  # peft's vanilla LoRA, as for a model loaded in bf16
        return LoraProduct.apply(dropped, result, a.weight, b.weight, scale)
