"""Building blocks: RMSNorm, rotary positions, attention (GQA or MLA) with a swappable core,
SwiGLU MLP.

>>> from moefn.adapters.reference.presets import get_preset
>>> attn = Attention(get_preset("tiny"))
>>> attn(torch.randn(2, 5, 32), torch.arange(5).expand(2, 5)).shape   # global positions
torch.Size([2, 5, 32])
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moefn.adapters.reference.config import MoEConfig


class RMSNorm(nn.Module):
    """``x / rms(x) * weight``, normalised in fp32.

    >>> RMSNorm(4, eps=0.0)(torch.tensor([[3.0, -3.0, 3.0, -3.0]])).tolist()
    [[1.0, -1.0, 1.0, -1.0]]
    """

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)  # an fp32 weight keeps x's dtype


def rotary(x: Tensor, position_ids: Tensor, theta: float) -> Tensor:
    """Rotate-half RoPE on ``x[B,heads,S,D]`` from global ``position_ids[B,S]`` (fp32 angles).

    >>> x = torch.randn(1, 2, 3, 8)
    >>> torch.equal(rotary(x, torch.zeros(1, 3, dtype=torch.long), 1e4), x)   # position 0
    True
    """
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=x.device, dtype=torch.float32)
                                / dim))
    angles = position_ids.float()[:, None, :, None] * inv_freq  # [B,1,S,D/2]
    cos = torch.cat((angles.cos(), angles.cos()), dim=-1)
    sin = torch.cat((angles.sin(), angles.sin()), dim=-1)
    first, second = x.float().chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


class AttentionImpl(Protocol):
    """``(q[B,Hq,S,D], k[B,Hkv,S,D], v[B,Hkv,S,D], position_ids[B,S], causal) -> [B,Hq,S,D]``."""

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, position_ids: Tensor,
                 causal: bool) -> Tensor: ...


def local_attention(q: Tensor, k: Tensor, v: Tensor, position_ids: Tensor,
                    causal: bool) -> Tensor:
    """Single-rank attention: expand grouped KV heads, then SDPA.

    >>> q, kv = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 3, 8)
    >>> local_attention(q, kv, kv, torch.arange(3)[None], causal=True).shape
    torch.Size([1, 4, 3, 8])
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


class CoreAttention(nn.Module):
    """The only place that runs scaled-dot-product attention; ``impl`` is swappable (CP)."""

    def __init__(self, causal: bool) -> None:
        super().__init__()
        self.causal = causal
        self.impl: AttentionImpl = local_attention

    def forward(self, q: Tensor, k: Tensor, v: Tensor, position_ids: Tensor) -> Tensor:
        return self.impl(q, k, v, position_ids, self.causal)


class Attention(nn.Module):
    """GQA self-attention: projections and rotary here, the attention itself in ``core``."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_heads
        self.head_dim, self.theta = config.head_dim, config.rope_theta
        self.q_proj = nn.Linear(config.hidden, config.n_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.hidden, bias=False)
        self.core = CoreAttention(config.causal)

    def forward(self, x: Tensor, position_ids: Tensor) -> Tensor:
        b, s, _ = x.shape

        def heads(t: Tensor) -> Tensor:  # as many heads as the projection gives (tp: a share)
            return t.view(b, s, -1, self.head_dim).transpose(1, 2)

        q = rotary(heads(self.q_proj(x)), position_ids, self.theta)
        k = rotary(heads(self.k_proj(x)), position_ids, self.theta)
        v = heads(self.v_proj(x))
        out = self.core(q, k, v, position_ids)
        projected: Tensor = self.o_proj(out.transpose(1, 2).reshape(b, s, -1))
        return projected


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3): low-rank query and key/value projections,
    each latent RMS-normed, and a decoupled rotary part (one key rope head shared by all heads).

    The core attention sees ordinary per-head ``q``, ``k`` (``head_dim + qk_rope_head_dim``
    wide) and ``v`` (``v_head_dim``), so context parallelism all-gathers K/V as for GQA.

    >>> from moefn.adapters.reference.presets import get_preset
    >>> attn = MLAttention(get_preset("tiny-mla"))
    >>> attn(torch.randn(2, 5, 32), torch.arange(5).expand(2, 5)).shape
    torch.Size([2, 5, 32])
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.n_heads, self.theta = config.n_heads, config.rope_theta
        self.nope, self.rope, self.v_dim = config.head_dim, config.qk_rope_head_dim, config.v_head_dim
        self.kv_rank = config.kv_lora_rank
        qk = self.nope + self.rope
        self.q_a_proj = nn.Linear(config.hidden, config.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(config.q_lora_rank, config.norm_eps)
        self.q_b_proj = nn.Linear(config.q_lora_rank, config.n_heads * qk, bias=False)
        self.kv_a_proj = nn.Linear(config.hidden, self.kv_rank + self.rope, bias=False)
        self.kv_a_norm = RMSNorm(self.kv_rank, config.norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_rank, config.n_heads * (self.nope + self.v_dim),
                                   bias=False)
        self.o_proj = nn.Linear(config.n_heads * self.v_dim, config.hidden, bias=False)
        self.core = CoreAttention(config.causal)

    def forward(self, x: Tensor, position_ids: Tensor) -> Tensor:
        b, s, _ = x.shape
        qk = self.nope + self.rope  # heads: as many as the projections give (tp: a share)
        q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x))).view(b, s, -1, qk)
        q_nope, q_rope = q.transpose(1, 2).split((self.nope, self.rope), dim=-1)
        latent, k_rope = self.kv_a_proj(x).split((self.kv_rank, self.rope), dim=-1)
        kv = self.kv_b_proj(self.kv_a_norm(latent)).view(b, s, -1, self.nope + self.v_dim
                                                          ).transpose(1, 2)
        k_nope, v = kv.split((self.nope, self.v_dim), dim=-1)
        k_rope = rotary(k_rope.unsqueeze(1), position_ids, self.theta)  # [B,1,S,rope]
        q = torch.cat((q_nope, rotary(q_rope, position_ids, self.theta)), dim=-1)
        k = torch.cat((k_nope, k_rope.expand(-1, k_nope.shape[1], -1, -1)), dim=-1)
        out = self.core(q, k, v, position_ids)
        projected: Tensor = self.o_proj(out.transpose(1, 2).reshape(b, s, -1))
        return projected


class DenseMLP(nn.Module):
    """SwiGLU feed-forward ``down(silu(gate(x)) * up(x))``.

    >>> DenseMLP(8, 16)(torch.randn(3, 8)).shape
    torch.Size([3, 8])
    """

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        return out
