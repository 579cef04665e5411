"""The reference decoder-only MoE transformer, its loss and a deterministic batch.

>>> torch.manual_seed(0)                                   # doctest: +SKIP
>>> model = MoETransformer(get_preset("tiny"))             # doctest: +SKIP
>>> ids, pos, labels = make_batch(model.config, 4, 16, seed=0)   # doctest: +SKIP
>>> loss = causal_lm_loss(model(ids, pos), labels, int((labels != -100).sum()))  # doctest: +SKIP
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moefn.models.config import MoEConfig
from moefn.models.layers import Attention, DenseMLP, RMSNorm
from moefn.models.moe import GroupedExperts, MoE, Router

MTP_WEIGHT = 0.3


class Block(nn.Module):
    def __init__(self, config: MoEConfig, dense: bool) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden, config.norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden, config.norm_eps)
        self.mlp: nn.Module = (DenseMLP(config.hidden, config.dense_intermediate) if dense
                               else MoE(config))

    def forward(self, x: Tensor, position_ids: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), position_ids)
        out: Tensor = x + self.mlp(self.mlp_norm(x))
        return out


class MTPBlock(nn.Module):
    """A DeepSeek-shaped multi-token-prediction block (simplified, see `MoETransformer`)."""

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
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden)
        self.layers = nn.ModuleList(Block(config, dense=i < config.n_dense_layers)
                                    for i in range(config.n_layers))
        self.norm = RMSNorm(config.hidden, config.norm_eps)
        self.lm_head = nn.Linear(config.hidden, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.mtp = MTPBlock(config) if config.mtp else None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Deterministic under ``torch.manual_seed``; also fills a model after ``to_empty``."""
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

    A sum divided by the *global* count: each rank passes its slice and the global count, and the
    ranks' losses add up to the single-process loss.
    """
    total = outputs[0].new_zeros((), dtype=torch.float32)
    for i, logits in enumerate(outputs):
        ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                             reduction="sum")
        total = total + (ce if i == 0 else MTP_WEIGHT * ce)
    return total / num_valid_tokens


def next_token_labels(input_ids: Tensor) -> Tensor:
    """Labels for next-token prediction: shifted left by one, the last position ignored."""
    labels = torch.full_like(input_ids, -100)
    labels[:, :-1] = input_ids[:, 1:]
    return labels


def make_batch(config: MoEConfig, batch: int, seq: int, seed: int) -> tuple[Tensor, Tensor,
                                                                            Tensor]:
    """Deterministic ``(input_ids, position_ids, labels)`` of shape ``[batch, seq]``."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq), generator=generator)
    position_ids = torch.arange(seq).expand(batch, seq).contiguous()
    return input_ids, position_ids, next_token_labels(input_ids)
