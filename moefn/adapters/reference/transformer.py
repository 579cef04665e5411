"""The reference decoder-only MoE transformer, its loss and a deterministic batch.

>>> from moefn.adapters.reference.presets import get_preset
>>> _ = torch.manual_seed(0)
>>> model = MoETransformer(get_preset("tiny"))
>>> ids, pos, labels = make_batch(model.config, batch=2, seq=8, seed=0)
>>> loss = causal_lm_loss(model(ids, pos), labels, int((labels != -100).sum()))
>>> 3.0 < loss.item() < 5.0   # about log(vocab=64) = 4.16 at init
True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moefn.adapters.reference.config import MoEConfig
from moefn.adapters.reference.layers import Attention, DenseMLP, MLAttention, RMSNorm
from moefn.adapters.reference.moe import GroupedExperts, MoE, Router

MTP_WEIGHT = 0.3


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(attn_norm(x))``, then ``x + mlp(mlp_norm(x))``.

    ``attn`` is `MLAttention` when the config has a ``kv_lora_rank``, else GQA `Attention`;
    ``mlp`` is a `DenseMLP` for ``dense=True``, else a `MoE`.
    """

    def __init__(self, config: MoEConfig, dense: bool) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden, config.norm_eps)
        self.attn: nn.Module = MLAttention(config) if config.kv_lora_rank else Attention(config)
        self.mlp_norm = RMSNorm(config.hidden, config.norm_eps)
        self.mlp: nn.Module = (DenseMLP(config.hidden, config.dense_intermediate) if dense
                               else MoE(config))

    def forward(self, x: Tensor, position_ids: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), position_ids)
        out: Tensor = x + self.mlp(self.mlp_norm(x))
        return out


class MTPBlock(nn.Module):
    """DeepSeek-shaped multi-token prediction, simplified: ``block(proj(cat(h, e)))``.

    ``h`` is the normed final hidden state of the main model and ``e`` the normed token
    embedding. It predicts the *same* labels as the main head (see `MoETransformer`).
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.norm_h = RMSNorm(config.hidden, config.norm_eps)
        self.norm_e = RMSNorm(config.hidden, config.norm_eps)
        self.proj = nn.Linear(2 * config.hidden, config.hidden, bias=False)
        self.block = Block(config, dense=False)

    def forward(self, hidden: Tensor, embedded: Tensor, position_ids: Tensor) -> Tensor:
        x = self.proj(torch.cat((self.norm_h(hidden), self.norm_e(embedded)), dim=-1))
        out: Tensor = self.block(x, position_ids)
        return out


class MoETransformer(nn.Module):
    """Token embedding → blocks (leading dense ones optional) → norm → lm_head (+ MTP head).

    ``forward(input_ids[B,S], position_ids[B,S])`` returns ``(logits,)`` or, with MTP,
    ``(logits, mtp_logits)``. The MTP head is an auxiliary head on the same labels (no extra
    sequence shift), so it stays valid when the sequence is split across context-parallel ranks.
    With ``tie_embeddings`` ``lm_head.weight`` is ``embed.weight`` (one Parameter), also after
    ``to_empty``/``to``.
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        # filled by init_weights (not nn.Embedding's own normal_: on meta that loads torch._dynamo)
        self.embed = nn.Embedding(config.vocab_size, config.hidden,
                                  _weight=torch.empty(config.vocab_size, config.hidden))
        self.layers = nn.ModuleList(Block(config, dense=i < config.n_dense_layers)
                                    for i in range(config.n_layers))
        self.norm = RMSNorm(config.hidden, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.mtp = MTPBlock(config) if config.mtp else None
        if not self.embed.weight.is_meta:  # nothing to fill on meta (and torch's meta normal_ is slow)
            self.init_weights()

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Self:
        """Conversions (``to_empty`` from meta makes new Parameters) keep an existing tie."""
        tied = self.lm_head.weight is self.embed.weight
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]  # untyped in torch
        if tied:
            self.lm_head.weight = self.embed.weight
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        """normal(0, init_std) linears, embedding and experts; router normal(0, 1/√H) so routing
        starts decisive; ones for norms; zeroed expert bias and counters.

        Deterministic under ``torch.manual_seed``; also fills a model after ``to_empty``.
        """
        std = self.config.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, Router):
                nn.init.normal_(module.weight, std=1.0 / module.weight.shape[1] ** 0.5)
                if module.expert_bias is not None:
                    module.expert_bias.zero_()
                module.tokens_per_expert.zero_()
            elif isinstance(module, GroupedExperts):
                nn.init.normal_(module.gate_up, std=std)
                nn.init.normal_(module.down, std=std)

    def forward(self, input_ids: Tensor, position_ids: Tensor) -> tuple[Tensor, ...]:
        embedded = self.embed(input_ids)
        x = embedded
        for layer in self.layers:
            x = layer(x, position_ids)
        logits = self.lm_head(self.norm(x))
        if self.mtp is None:
            return (logits,)
        mtp_hidden = self.mtp(x, embedded, position_ids)
        return logits, self.lm_head(self.norm(mtp_hidden))


def causal_lm_loss(outputs: tuple[Tensor, ...], labels: Tensor,
                   num_valid_tokens: int | Tensor) -> Tensor:
    """(Σ CE over valid tokens of the main head + 0.3·the same for MTP) / num_valid_tokens.

    ``labels`` are already shifted (see `next_token_labels`); -100 is ignored. A sum divided by
    the *global* count: each rank passes its slice and the global count, and the ranks' losses
    add up to the single-process loss.

    >>> logits = torch.zeros(1, 2, 4)   # uniform over 4 classes: CE = log 4 per token
    >>> causal_lm_loss((logits, logits), torch.tensor([[1, -100]]), 1)
    tensor(1.8022)
    """
    sums = [F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                            reduction="sum") for logits in outputs]
    total = sums[0] + MTP_WEIGHT * sum(sums[1:], torch.zeros_like(sums[0]))
    return total / num_valid_tokens


def next_token_labels(input_ids: Tensor) -> Tensor:
    """Labels for next-token prediction: shifted left by one, the last position ignored.

    >>> next_token_labels(torch.tensor([[5, 6, 7]]))
    tensor([[   6,    7, -100]])
    """
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def make_batch(config: MoEConfig, batch: int, seq: int, seed: int) -> tuple[Tensor, Tensor,
                                                                            Tensor]:
    """Deterministic ``(input_ids, position_ids, labels)`` of shape ``[batch, seq]``.

    >>> from moefn.adapters.reference.presets import get_preset
    >>> ids, pos, labels = make_batch(get_preset("tiny"), batch=2, seq=4, seed=0)
    >>> pos.tolist(), torch.equal(ids, make_batch(get_preset("tiny"), 2, 4, seed=0)[0])
    ([[0, 1, 2, 3], [0, 1, 2, 3]], True)
    """
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
    position_ids = torch.arange(seq).expand(batch, seq).contiguous()
    return input_ids, position_ids, next_token_labels(input_ids)
