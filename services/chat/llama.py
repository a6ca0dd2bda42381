"""The Llama decoder (SmolLM2 and other Llama-architecture models) in plain torch.

Why this exists: importing transformers' modeling code costs ~2.4 s of CPU on
this machine (transformers 5.x decorates classes with `torch.compiler.disable`,
which imports torch._dynamo, which imports sympy and torch.distributed.tensor;
modeling_utils adds scipy.optimize through the object-detection losses). None
of that is needed to run a 135M decoder, and it kept a restart from the cached
weights at ~4.2 s. This module imports only torch and safetensors, so a restart
is SERVING in ~2 s. It reads the very safetensors folder that transformers
wrote (same tensor names) and is the same computation as transformers'
`LlamaForCausalLM` with SDPA attention: tests compare logits and greedy text
with it. Anything it does not cover (other architectures, RoPE scaling,
biases in the MLP...) is declined by `supports()` and loads through
transformers as before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn


def read_config(folder: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((folder / "config.json").read_text())
    return config


def supports(folder: Path) -> bool:
    """True when the folder holds a plain Llama model this module computes exactly."""
    try:
        config = read_config(folder)
    except (OSError, ValueError):
        return False
    rope = config.get("rope_parameters") or {}
    return (
        config.get("model_type") == "llama"
        and config.get("hidden_act", "silu") == "silu"
        and not config.get("mlp_bias", False)
        and config.get("pretraining_tp", 1) == 1
        and not config.get("rope_scaling")
        and rope.get("rope_type", "default") == "default"
        and "rope_theta" in rope
        and (folder / "model.safetensors").is_file()
    )


def eos_token_ids(folder: Path) -> int | list[int] | None:
    """What transformers' `model.generation_config.eos_token_id` would hold."""
    generation = folder / "generation_config.json"
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        if eos is not None:
            return eos
    return read_config(folder).get("eos_token_id")


@dataclass
class LlamaShape:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    attention_bias: bool
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LlamaShape:
        heads = config["num_attention_heads"]
        return cls(
            hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=config.get("num_key_value_heads") or heads,
            head_dim=config.get("head_dim") or config["hidden_size"] // heads,
            vocab_size=config["vocab_size"],
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=config["rope_parameters"]["rope_theta"],
            attention_bias=config.get("attention_bias", False),
            tie_word_embeddings=config.get("tie_word_embeddings", False),
        )


class KVCache:
    """Keys and values per layer, [batch, kv_heads, tokens, head_dim]. The two
    methods the engine uses (`get_seq_length`, `crop`) behave as
    transformers' DynamicCache does."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def copy(self) -> KVCache:
        """A cache that starts where this one is and grows apart from it. The
        tensors are shared: neither `update` (which concatenates into new ones)
        nor `crop` (which slices) ever writes into them."""
        twin = KVCache()
        twin.keys, twin.values = list(self.keys), list(self.values)
        return twin

    def get_seq_length(self) -> int:
        return int(self.keys[0].shape[-2]) if self.keys else 0

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` tokens (negative, as DynamicCache takes it)."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number: the tokens to remove from the end.")
        if tokens_to_remove == 0:
            return
        self.keys = [k[..., :tokens_to_remove, :] for k in self.keys]
        self.values = [v[..., :tokens_to_remove, :] for v in self.values]

    def update(
        self, layer: int, key: torch.Tensor, value: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer == len(self.keys):
            self.keys.append(key)
            self.values.append(value)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], key], dim=-2)
            self.values[layer] = torch.cat([self.values[layer], value], dim=-2)
        return self.keys[layer], self.values[layer]


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    cache: KVCache | None


# Generating a token reads every weight once, so it is bound by memory traffic.
# A 4-bit GGUF (the default model is Q4_1) holds each run of 32 weights as 16
# evenly spaced levels; dequantised to bfloat16 they still sit on that grid, so
# they can be packed back into 4 bits exactly and multiplied by torch's int4
# kernel: a quarter of the bytes, the same values. With many rows at once (a
# prompt) the work is compute-bound and the int4 kernel is slower, so prompts
# keep the bfloat16 weights. Weights not on such a grid stay as they are:
# nothing is quantised that was not already.
PACKED_MAX_ROWS = 8
GROUP = 32


def pack_4bit(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(packed weight, scales and zeros) for torch's int4 kernel when every group
    of 32 weights of a row sits on 16 evenly spaced levels; None otherwise."""
    rows, columns = weight.shape
    if weight.dtype != torch.bfloat16 or columns % GROUP or rows % 16:
        return None
    grouped = weight.float().view(rows, columns // GROUP, GROUP)
    low = grouped.amin(-1, keepdim=True)
    step = (grouped.amax(-1, keepdim=True) - low) / 15
    levels = torch.round((grouped - low) / torch.where(step > 0, step, 1)).clamp(0, 15)
    # bfloat16 rounding of the dequantised values moves them ~0.06 step at most;
    # weights off the grid land up to half a step away.
    if ((levels * step + low - grouped).abs() > 0.25 * step + 1e-7).any():
        return None
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            levels.view(rows, columns).to(torch.int32), 2
        )
    except (RuntimeError, AttributeError):  # a torch without the CPU int4 kernel
        return None
    # The kernel computes (level - 8) * scale + zero.
    scales_zeros = torch.stack([step[..., 0], low[..., 0] + 8 * step[..., 0]], dim=-1)
    return packed, scales_zeros.transpose(0, 1).contiguous().to(torch.bfloat16)


class Linear(nn.Module):
    """nn.Linear without its random initialisation: every weight is loaded
    afterwards, and initialising 135M parameters costs ~0.3 s. (The meta
    device would avoid that too, but ops on it import torch._dynamo, ~1 s.)
    Optionally with a 4-bit copy of the weight for a few rows at a time."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.packed: tuple[torch.Tensor, torch.Tensor] | None = None

    def pack_for_decode(self) -> bool:
        """Adds the 4-bit copy if the weight sits on a 4-bit grid; says whether it did."""
        self.packed = pack_4bit(self.weight.detach())
        return self.packed is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.packed
        if packed is not None and x.numel() <= PACKED_MAX_ROWS * x.shape[-1]:
            rows = x.reshape(-1, x.shape[-1])
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, packed[0], GROUP, packed[1])
            if self.bias is not None:
                out = out + self.bias
            return out.view(*x.shape[:-1], -1)
        return F.linear(x, self.weight, self.bias)


class Embedding(nn.Module):
    def __init__(self, count: int, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(count, size))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # In float32, then back: the same rounding as transformers' LlamaRMSNorm.
        dtype = hidden.dtype
        hidden = hidden.float()
        hidden = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * hidden.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, shape: LlamaShape, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = shape.num_heads
        self.num_kv_heads = shape.num_kv_heads
        self.head_dim = shape.head_dim
        bias = shape.attention_bias
        self.q_proj = Linear(shape.hidden_size, shape.num_heads * shape.head_dim, bias=bias)
        self.k_proj = Linear(shape.hidden_size, shape.num_kv_heads * shape.head_dim, bias=bias)
        self.v_proj = Linear(shape.hidden_size, shape.num_kv_heads * shape.head_dim, bias=bias)
        self.o_proj = Linear(shape.num_heads * shape.head_dim, shape.hidden_size, bias=bias)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        batch, length, _ = hidden.shape
        q = self.q_proj(hidden).view(batch, length, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden).view(batch, length, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden).view(batch, length, -1, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and length > 1,
            scale=self.head_dim**-0.5,
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, -1))


class MLP(nn.Module):
    def __init__(self, shape: LlamaShape) -> None:
        super().__init__()
        self.gate_proj = Linear(shape.hidden_size, shape.intermediate_size, bias=False)
        self.up_proj = Linear(shape.hidden_size, shape.intermediate_size, bias=False)
        self.down_proj = Linear(shape.intermediate_size, shape.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, shape: LlamaShape, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(shape, layer)
        self.mlp = MLP(shape)
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> torch.Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cos, sin, mask, cache)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Backbone(nn.Module):
    def __init__(self, shape: LlamaShape) -> None:
        super().__init__()
        self.embed_tokens = Embedding(shape.vocab_size, shape.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(shape, i) for i in range(shape.num_layers))
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)


def rope_inverse_frequencies(shape: LlamaShape) -> torch.Tensor:
    steps = torch.arange(0, shape.head_dim, 2, dtype=torch.float) / shape.head_dim
    return 1.0 / (shape.rope_theta**steps)


class LlamaForCausalLM(nn.Module):
    """Called like transformers' model by the engine:
    `model(input_ids=..., cache=..., use_cache=..., logits_to_keep=...)`."""

    inv_freq: torch.Tensor

    def __init__(self, shape: LlamaShape) -> None:
        super().__init__()
        self.shape = shape
        self.model = Backbone(shape)
        self.lm_head = Linear(shape.hidden_size, shape.vocab_size, bias=False)
        if shape.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inverse_frequencies(shape), persistent=False)

    @classmethod
    def load(cls, folder: Path, dtype: torch.dtype) -> LlamaForCausalLM:
        shape = LlamaShape.from_config(read_config(folder))
        # Parameters start as uninitialised memory; the saved tensors are assigned as they are.
        model = cls(shape)
        state = {
            name: tensor.to(dtype)
            for name, tensor in load_file(folder / "model.safetensors").items()
        }
        if shape.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        missing = [name for name in missing if name != "lm_head.weight"]
        if missing or unexpected:
            raise ValueError(
                f"{folder} does not hold the Llama weights expected: missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}"
            )
        if shape.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        # Buffers made on the meta device hold no values: compute the RoPE table for real.
        model.inv_freq = rope_inverse_frequencies(shape)
        return model.eval()

    def packed_state(self) -> dict[str, torch.Tensor]:
        """The 4-bit copies, by projection name (to keep them beside the weights)."""
        state = {}
        for name, module in self.named_modules():
            if isinstance(module, Linear) and module.packed is not None:
                state[f"{name}.packed"], state[f"{name}.scales_zeros"] = module.packed
        return state

    def load_packed(self, state: dict[str, torch.Tensor]) -> int:
        """Puts back copies saved by `packed_state`; returns how many."""
        count = 0
        for name, module in self.named_modules():
            if isinstance(module, Linear) and f"{name}.packed" in state:
                module.packed = (state[f"{name}.packed"], state[f"{name}.scales_zeros"])
                count += 1
        return count

    def pack_for_decode(self) -> int:
        """4-bit copies of the projections whose weights sit on a 4-bit grid, for
        token-by-token generation; returns how many were packed."""
        linears = [module for module in self.modules() if isinstance(module, Linear)]
        return sum(linear.pack_for_decode() for linear in linears)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        use_cache: bool = True,
        logits_to_keep: int = 0,
    ) -> CausalLMOutput:
        if use_cache and cache is None:
            cache = KVCache()
        if not use_cache:
            cache = None
        past = cache.get_seq_length() if cache is not None else 0
        length = input_ids.shape[1]
        hidden = self.model.embed_tokens(input_ids)
        positions = torch.arange(past, past + length, dtype=torch.float)
        freqs = positions[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(hidden.dtype), emb.sin().to(hidden.dtype)
        mask = None
        if past and length > 1:
            # New tokens after a cached prefix: each sees the whole prefix and the
            # new tokens up to itself (SDPA's is_causal would align to the top-left).
            mask = torch.ones(length, past + length, dtype=torch.bool).tril(diagonal=past)
        for layer in self.model.layers:
            hidden = layer(hidden, cos, sin, mask, cache)
        hidden = self.model.norm(hidden)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:, :]
        return CausalLMOutput(logits=self.lm_head(hidden), cache=cache)
