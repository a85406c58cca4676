"""The fast LoRA training step: the numerics behind fine_tune_sentiment.py's FAST_STEP, kept out of the story.

Three rewrites of a peft LoRA model's training step that cut its time on a CPU (bench/lora_step.py); the model, the
loss and the dropout rates stay what they were:
- every dropout (peft's on each LoRA input, the encoder's own and its attention's) draws its mask from 16 random bits
  an element instead of torch's bernoulli_ (p rounded to 1/65536); layers that read the same tensor (query, key and
  value) share one dropped copy of it, as one dropout of their common input;
- attention with dropout, training on a CPU, runs as softmax, mask, matmul in place of SDPA's math kernel and its
  bernoulli_ (with no dropout, in evaluation and off the CPU, SDPA runs as before);
- each LoRA layer (fp32, or under autocast) adds its x A^T B^T * scale in one autograd function: the scale is
  applied to the rank-r product, the sum is one addmm, and the weight gradients are taken in the orientation CPU
  matmuls are fast at; under autocast its products run in autocast's dtype, as peft's would, and its input is not
  cast up to the LoRA weights' fp32 first (peft's cast, a copy of each bf16 activation there and back).

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
ATTENTION = "sdpa_cheap_dropout"  # the name cheap_attention is registered under with transformers
CASTS: dict = {}  # reused()'s entry for FusedLora's casts under autocast
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
    use_cheap_attention(model)
    if not hook_is_usable(layers):
        warn_once("warning: peft's LoraVariant hook is not what fast_lora.py expects (a newer peft?); training "
                  "with peft's own LoRA step (slower on a CPU, same results)")
        return False
    fused = [layer for layer in layers if type(layer) is LoraLinear and not layer.fan_in_fan_out]
    for layer in fused:
        layer.lora_variant.update({name: FusedLora() for name in layer.lora_A if name not in layer.lora_variant
                                   and not layer.lora_bias[name]})
        if all(isinstance(layer.lora_variant.get(name), FusedLora) for name in layer.lora_A):
            layer.cast_input_dtype_enabled = False  # FusedLora casts what it needs, once
    return bool(fused)


def use_cheap_attention(model) -> None:
    """Point the model's SDPA attention at cheap_attention (its masks too: the same boolean ones)."""
    from transformers import PreTrainedConfig

    register_cheap_attention()
    for module in model.modules():
        config = getattr(module, "config", None)
        if isinstance(config, PreTrainedConfig) and config._attn_implementation == "sdpa":
            config._attn_implementation = ATTENTION


@functools.cache
def register_cheap_attention() -> None:
    """Register cheap_attention, and SDPA's masks, with transformers under the name ATTENTION (once a process)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(ATTENTION, functools.partial(cheap_attention, fallback=sdpa_attention_forward))
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


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


def cheap_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                    *, fallback, **kwargs):
    """transformers' attention interface: with dropout, training on a CPU, a bidirectional attention with no
    position bias or grouped heads as softmax, cheap dropout (dropped()), matmul; otherwise fallback (SDPA)."""
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal  # as SDPA's wrapper reads it
    plain = not (causal or kwargs.get("position_bias") is not None or kwargs.get("output_attentions")
                 or getattr(module, "num_key_value_groups", 1) > 1)
    if not (dropout and module.training and query.device.type == "cpu" and plain):
        return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    scores = torch.matmul(query, key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:  # SDPA's: True where a key takes part, or a float to add
        scores = scores.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool \
            else scores + attention_mask
    weights = dropped(torch.softmax(scores, dim=-1).to(value.dtype), dropout)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), None


def dropped(x, p: float):
    """x with a fraction p (rounded to 1/65536) of its elements zeroed, drawn from 16 random bits an element, and the
    rest scaled by 1/(1-p); in a low precision the scale is applied as a number (a mask of it would be rounded)."""
    bits = torch.empty(-(-x.numel() // 4), dtype=torch.int64, device=x.device).random_(-2**63, None)  # 64 bits each
    threshold = round(p * 65536)
    keep = bits.view(torch.int16)[:x.numel()].view(x.shape) >= threshold - 32768
    scale = 65536 / (65536 - threshold)
    return x * keep.to(x.dtype).mul_(scale) if torch.finfo(x.dtype).bits >= 32 else (x * keep).mul_(scale)


def reused(last: dict, x, key, make):
    """make(), or what it gave for the last call with this very tensor x and key (query, key and value read one
    input): one entry, replaced whole (so threads never mix two), holding x weakly (freed as usual)."""
    seen, seen_key, found = last.get("entry", (lambda: None, None, None))
    if seen() is not x or seen_key != key:
        found = make()
        last["entry"] = (weakref.ref(x), key, found)
    return found


class Dropout(torch.nn.Module):
    """Dropout by dropped(); with `last` (a dict shared by the LoRA layers), layers that read the same input tensor
    get the same dropped tensor, one mask and one product for all of them."""

    def __init__(self, p: float, last: dict | None):
        super().__init__()
        self.p, self.last = p, last

    def forward(self, x):
        if not self.training:
            return x
        if self.last is None:
            return dropped(x, self.p)
        return reused(self.last, x, (self.p, torch.is_grad_enabled()), lambda: dropped(x, self.p))


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
        dropout, scale = module.lora_dropout[active_adapter], module.scaling[active_adapter]
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        if dtype is None and not x.dtype == a.weight.dtype == result.dtype:
            return result + b(a(dropout(x.to(a.weight.dtype)))) * scale  # peft's vanilla LoRA (weights in bf16)
        if dtype is not None and x.dtype != dtype:  # cast down once for the layers reading x, then dropped
            x = reused(CASTS, x, (dtype, torch.is_grad_enabled()), functools.partial(x.to, dtype))
        return LoraProduct.apply(dropout(x), result, a.weight, b.weight, scale)
