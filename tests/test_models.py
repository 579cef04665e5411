"""The reference MoE transformer: shapes, routing, expert compute, loss, init, presets."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from attrs import evolve
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from moefn.adapters.reference import (
    PRESETS,
    Attention,
    DenseMLP,
    GroupedExperts,
    MLAttention,
    MoE,
    MoEConfig,
    MoETransformer,
    Router,
    causal_lm_loss,
    get_preset,
    make_batch,
    next_token_labels,
)
from moefn.grouped_experts import ExpertsImpl, grouped_mm_supported, run_grouped_experts

TINY = get_preset("tiny")
TINY_FULL = get_preset("tiny-full")


def build(config: MoEConfig, seed: int = 0) -> MoETransformer:
    torch.manual_seed(seed)
    return MoETransformer(config)


def swiglu_expert(x: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
    gate, up = (x @ gate_up).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ down


def assert_close(actual: Tensor, expected: Tensor, rel: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * expected.abs().max().item())


@pytest.mark.parametrize("name", ["tiny", "tiny-full", "small"])
def test_forward_shapes(name: str) -> None:
    config = get_preset(name)
    ids, pos, _ = make_batch(config, batch=2, seq=6, seed=0)
    outputs = build(config)(ids, pos)
    assert len(outputs) == (2 if config.mtp else 1)
    assert all(out.shape == (2, 6, config.vocab_size) for out in outputs)


def test_module_tree_contract() -> None:
    model = build(TINY_FULL)
    assert isinstance(model.layers[0].mlp, DenseMLP)  # the leading dense layer
    moe = model.layers[1].mlp
    assert isinstance(moe, MoE) and moe.shared is not None
    assert moe.router.keep_fp32 and moe.router.expert_bias is not None
    assert "expert_bias" in moe.router.state_dict()
    assert "tokens_per_expert" not in moe.router.state_dict()
    assert model.mtp is not None and isinstance(model.mtp.block.mlp, MoE)
    assert moe.experts.gate_up.shape == (8, 32, 32) and moe.experts.down.shape == (8, 16, 32)
    calls: list[str] = []
    for name in ("norm", "lm_head", "embed"):
        model.get_submodule(name).register_forward_hook(
            lambda m, args, out, name=name: calls.append(name))
    model(*make_batch(TINY_FULL, batch=1, seq=4, seed=0)[:2])
    assert sorted(calls) == ["embed", "lm_head", "lm_head", "norm", "norm"]  # MTP shares both


def test_tiny_full_trains() -> None:
    model = build(TINY_FULL)
    ids, pos, labels = make_batch(TINY_FULL, batch=4, seq=16, seed=1)
    count = int((labels != -100).sum())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(6):
        optimizer.zero_grad()
        loss = causal_lm_loss(model(ids, pos), labels, count)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3, losses
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert model.lm_head.weight is model.embed.weight


def test_weights_are_tied_only_when_asked() -> None:
    tied, untied = build(TINY_FULL), build(TINY)
    assert tied.lm_head.weight is tied.embed.weight
    assert untied.lm_head.weight is not untied.embed.weight
    shared = len(list(tied.named_parameters(remove_duplicate=False))) - len(list(tied.parameters()))
    assert shared == 1


def test_init_is_deterministic_and_works_after_to_empty() -> None:
    with torch.device("meta"):
        lazy = MoETransformer(TINY_FULL)
    lazy.to_empty(device="cpu")
    eager = build(TINY_FULL, seed=3)
    for model in (lazy, eager):
        torch.manual_seed(7)
        model.init_weights()
    assert lazy.lm_head.weight is lazy.embed.weight
    eager_state = eager.state_dict()
    for key, value in lazy.state_dict().items():
        assert torch.equal(value, eager_state[key]), key
    router = lazy.layers[1].mlp.router
    assert isinstance(router, Router)
    assert torch.equal(router.tokens_per_expert, torch.zeros(8))
    assert torch.equal(lazy.layers[0].attn_norm.weight, torch.ones(32))


def test_init_gives_non_degenerate_routing() -> None:
    model = build(get_preset("small"))
    top_weights: list[Tensor] = []
    routers = [m for m in model.modules() if isinstance(m, Router)]
    for router in routers:
        router.register_forward_hook(lambda m, args, out: top_weights.append(out[1][:, 0]))
    ids, pos, _ = make_batch(model.config, batch=4, seq=32, seed=0)
    model(ids, pos)
    uniform = 1 / model.config.n_experts
    for router, top in zip(routers, top_weights, strict=True):
        used = router.tokens_per_expert
        assert int((used > 0).sum()) == model.config.n_experts
        assert used.max() < 0.5 * used.sum()
        assert top.mean() > 2 * uniform  # decisive, not near-uniform, scores


@pytest.mark.parametrize("causal", [True, False])
def test_causal_mask(causal: bool) -> None:
    config = evolve(TINY_FULL, causal=causal)
    model = build(config)
    ids, pos, _ = make_batch(config, batch=2, seq=8, seed=0)
    changed = ids.clone()
    changed[:, 5] = (changed[:, 5] + 1) % config.vocab_size
    before, after = model(ids, pos), model(changed, pos)
    for old, new in zip(before, after, strict=True):
        assert not torch.allclose(old[:, 5:], new[:, 5:], atol=1e-4)
        assert torch.allclose(old[:, :5], new[:, :5], atol=1e-6) == causal


def test_rotary_uses_relative_positions_from_position_ids() -> None:
    torch.manual_seed(0)
    attn = Attention(TINY)
    x = torch.randn(2, 6, 32)
    pos = torch.arange(6).expand(2, 6)
    assert_close(attn(x, pos + 100), attn(x, pos))  # a shift of every position is invisible
    assert not torch.allclose(attn(x, pos * 2), attn(x, pos), atol=1e-4)


def test_core_attention_delegates_to_impl() -> None:
    torch.manual_seed(0)
    attn = Attention(TINY)
    seen: list[tuple[tuple[int, ...], tuple[int, ...], bool]] = []

    def impl(q: Tensor, k: Tensor, v: Tensor, position_ids: Tensor, causal: bool) -> Tensor:
        seen.append((tuple(q.shape), tuple(k.shape), causal))
        return torch.zeros_like(q)

    attn.core.impl = impl
    out = attn(torch.randn(2, 5, 32), torch.arange(5).expand(2, 5))
    assert seen == [((2, 4, 5, 8), (2, 2, 5, 8), True)]
    assert torch.equal(out, torch.zeros(2, 5, 32))


def expert_params(seed: int, experts: int = 8, hidden: int = 32,
                  inter: int = 16) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(experts, hidden, 2 * inter, generator=generator) * 0.2
    down = torch.randn(experts, inter, hidden, generator=generator) * 0.2
    return gate_up.requires_grad_(), down.requires_grad_()


@pytest.mark.parametrize("counts", [[0, 3, 0, 5, 2, 0, 4, 0], [0] * 8, [14, 0, 0, 0, 0, 0, 0, 0]])
def test_grouped_mm_matches_loop(counts: list[int]) -> None:
    count_tensor = torch.tensor(counts)
    x = torch.randn(sum(counts), 32, generator=torch.Generator().manual_seed(1))
    grad_out = torch.randn(sum(counts), 32, generator=torch.Generator().manual_seed(2))
    results = {}
    for impl in ("grouped_mm", "loop"):
        gate_up, down = expert_params(seed=0)
        xi = x.clone().requires_grad_()
        y = run_grouped_experts(xi, count_tensor, gate_up, down, impl=impl)
        (y * grad_out).sum().backward()
        assert xi.grad is not None and gate_up.grad is not None and down.grad is not None
        results[impl] = (y, xi.grad, gate_up.grad, down.grad)
    for grouped, looped in zip(results["grouped_mm"], results["loop"], strict=True):
        assert grouped.shape == looped.shape
        if grouped.numel():
            assert_close(grouped, looped)
    empty = [e for e, c in enumerate(counts) if c == 0]
    assert torch.equal(results["grouped_mm"][2][empty], torch.zeros(len(empty), 32, 32))


def test_grouped_mm_backward_with_expanded_gradient() -> None:
    gate_up, down = expert_params(seed=0)
    x = torch.randn(6, 32, requires_grad=True)
    run_grouped_experts(x, torch.tensor([2, 0, 4, 0, 0, 0, 0, 0]), gate_up, down,
                        impl="grouped_mm").sum().backward()
    assert gate_up.grad is not None and gate_up.grad[0].abs().sum() > 0


def test_grouped_mm_support_rules() -> None:
    gate_up = torch.zeros(2, 32, 32)
    assert grouped_mm_supported(torch.zeros(1, 32), gate_up)
    assert grouped_mm_supported(torch.zeros(1, 32, dtype=torch.bfloat16), gate_up)
    assert not grouped_mm_supported(torch.zeros(1, 32, dtype=torch.float64), gate_up)
    assert not grouped_mm_supported(torch.zeros(1, 30), torch.zeros(2, 30, 30))  # misaligned
    assert not grouped_mm_supported(torch.zeros(1, 32, device="meta"), gate_up)
    assert grouped_mm_supported(torch.zeros(1, 32, dtype=torch.bfloat16, device="meta"), gate_up)


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_local_dispatch_matches_naive_per_token(impl: ExpertsImpl) -> None:
    experts = GroupedExperts(evolve(TINY, experts_impl=impl))
    gate_up, down = expert_params(seed=3)
    with torch.no_grad():
        experts.gate_up.copy_(gate_up)
        experts.down.copy_(down)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(10, 32, generator=generator)
    index = torch.stack([torch.randperm(7, generator=generator)[:2] for _ in range(10)])
    weights = torch.rand(10, 2, generator=generator)
    expected = torch.stack([
        sum((weights[t, k] * swiglu_expert(x[t], gate_up[int(index[t, k])],
                                           down[int(index[t, k])]) for k in range(2)),
            torch.zeros(32))
        for t in range(10)])
    assert_close(experts(x, index, weights), expected.detach())


def test_tokens_per_expert_counts_routed_slots() -> None:
    torch.manual_seed(0)
    router = Router(TINY)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(20, 32)
    index, weights = router(x)
    router(x)
    assert index.dtype == torch.int64 and index.shape == weights.shape == (20, 2)
    assert torch.equal(router.tokens_per_expert, 2.0 * torch.bincount(index.flatten(), minlength=8))
    assert router.tokens_per_expert.dtype == torch.float32


def test_checkpoint_recompute_does_not_count_twice() -> None:
    torch.manual_seed(0)
    moe = MoE(TINY)
    for param in (moe.router.weight, moe.experts.gate_up, moe.experts.down):
        torch.nn.init.normal_(param, std=0.2)
    x = torch.randn(2, 5, 32, requires_grad=True)
    out = checkpoint(moe, x, use_reentrant=False)
    assert isinstance(out, Tensor)
    out.sum().backward()
    assert moe.router.tokens_per_expert.sum() == 2 * 5 * 2


def test_router_softmax_weights_are_probabilities() -> None:
    torch.manual_seed(0)
    router = Router(TINY)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(4, 32)
    index, weights = router(x)
    probs = (x @ router.weight.t()).softmax(-1)
    assert torch.equal(index, probs.topk(2).indices)
    assert_close(weights, probs.gather(-1, index))


def test_expert_bias_picks_experts_but_not_weights() -> None:
    torch.manual_seed(0)
    router = Router(TINY_FULL)
    torch.nn.init.normal_(router.weight)
    assert router.expert_bias is not None
    router.expert_bias[5] = 10.0
    x = torch.randn(6, 32)
    index, weights = router(x)
    assert (index == 5).any(-1).all()
    scores = (x @ router.weight.t()).sigmoid().gather(-1, index)
    assert_close(weights, scores / scores.sum(-1, keepdim=True))


def test_router_fp32_scores_in_fp32() -> None:
    torch.manual_seed(0)
    router = Router(TINY_FULL).bfloat16()
    torch.nn.init.normal_(router.weight)
    x = torch.randn(64, 32).bfloat16()
    index, weights = router(x)
    assert weights.dtype == torch.bfloat16
    scores = (x.float() @ router.weight.float().t()).sigmoid()
    assert torch.equal(index, scores.topk(2).indices)


def test_loss_is_a_sum_over_a_global_count() -> None:
    model = build(TINY_FULL)
    ids, pos, labels = make_batch(TINY_FULL, batch=2, seq=8, seed=0)
    outputs = model(ids, pos)
    count = int((labels != -100).sum())
    whole = causal_lm_loss(outputs, labels, count)
    halves = sum(causal_lm_loss(tuple(o[:, part] for o in outputs), labels[:, part], count)
                 for part in (slice(0, 3), slice(3, 8)))
    assert_close(halves, whole)
    main = F.cross_entropy(outputs[0].flatten(0, 1), labels.flatten(), ignore_index=-100)
    extra = F.cross_entropy(outputs[1].flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert_close(whole, main + 0.3 * extra)


def test_labels_and_batches() -> None:
    assert next_token_labels(torch.tensor([[1, 2, 3]])).tolist() == [[2, 3, -100]]
    first, second = make_batch(TINY, 2, 5, seed=9), make_batch(TINY, 2, 5, seed=9)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not torch.equal(first[0], make_batch(TINY, 2, 5, seed=10)[0])


@pytest.mark.parametrize(("name", "low", "high"),
                         [("deepseek-v3", 682e9, 684e9), ("qwen3-30b-a3b", 29e9, 32e9)])
def test_full_presets_build_on_meta(name: str, low: float, high: float) -> None:
    start = time.perf_counter()
    with torch.device("meta"):
        model = MoETransformer(get_preset(name))
    elapsed = time.perf_counter() - start
    total = sum(p.numel() for p in model.parameters())
    print(f"{name}: {total / 1e9:.1f}B parameters, built in {elapsed:.2f}s")
    assert low < total < high
    assert elapsed < 5.0


def test_deepseek_v3_has_the_parameters_of_the_real_model() -> None:
    """MLA and all: without its MTP block, what transformers' DeepSeek-V3 has (671 B) ± 0.5 %."""
    pytest.importorskip("transformers")
    from moefn.adapters.transformers.presets import build_hf_model, hf_preset_config

    with torch.device("meta"):
        ours = MoETransformer(get_preset("deepseek-v3"))
    hf = build_hf_model(hf_preset_config("hf-deepseek-v3"))
    main = sum(p.numel() for n, p in ours.named_parameters() if not n.startswith("mtp."))
    reference = sum(p.numel() for p in hf.parameters())
    assert 670e9 < reference < 672e9
    assert abs(main - reference) <= 0.005 * reference, (main, reference)
    attention = {n.partition("attn.")[2]: tuple(p.shape)
                 for n, p in ours.named_parameters() if n.startswith("layers.0.attn.")}
    assert attention == {"q_a_proj.weight": (1536, 7168), "q_a_norm.weight": (1536,),
                         "q_b_proj.weight": (128 * 192, 1536), "kv_a_proj.weight": (576, 7168),
                         "kv_a_norm.weight": (512,), "kv_b_proj.weight": (128 * 256, 512),
                         "o_proj.weight": (7168, 128 * 128)}


def test_mla_attention_is_causal_and_uses_the_rope_head() -> None:
    torch.manual_seed(0)
    attn = MLAttention(get_preset("tiny-mla"))
    x = torch.randn(1, 6, 32)
    positions = torch.arange(6)[None]
    full = attn(x, positions)
    assert_close(attn(x[:, :4], positions[:, :4]), full[:, :4])  # the future is not seen
    shifted = attn(x, positions + 3)  # relative positions unchanged: same output
    assert_close(shifted, full)
    assert not torch.allclose(attn(x, 2 * positions), full)  # distances reach the rope head


def test_presets_and_config_validation() -> None:
    assert {"tiny", "tiny-full", "small", "deepseek-v3", "qwen3-30b-a3b"} <= set(PRESETS)
    with pytest.raises(ValueError, match="tiny-full"):
        get_preset("nope")
    with pytest.raises(ValueError, match="top_k"):
        evolve(TINY, top_k=9)
    with pytest.raises(ValueError, match="n_kv_heads"):
        evolve(TINY, n_kv_heads=3)
    with pytest.raises(ValueError, match="dense_intermediate"):
        evolve(TINY, n_dense_layers=1)
    with pytest.raises(ValueError):
        evolve(TINY, score_func="relu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="MLA"):
        evolve(TINY, kv_lora_rank=8)
