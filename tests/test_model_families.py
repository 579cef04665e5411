"""What the `nox -s models` sweep found, in one process each (cheap): tiny configs that run,
per-layer configs read per layer, families refused by name, recognisers that crash refused typed,
and parameters whose zero initialisation stops gradients set so that the sweep can compare."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from moefn import PlanError, inspect_model
from moefn.adapters.reference import causal_lm_loss
from moefn.adapters.transformers.catalogue import build_tiny, plan_row, tiny_overrides
from moefn.plan.hf_refusals import REASONS
from moefn.plan.roles import Recognition
from moefn.plan.spec import RECOGNISERS, register_recogniser
from tests.hf_parity import build_hf, hf_batch, logits_of


def _gradients(family: str) -> dict[str, float]:
    """Each parameter's largest gradient after one loss of the tiny ``family`` in one process."""
    model = build_hf(family)
    batch = hf_batch(int(model.config.vocab_size), 2, 8, 0)
    causal_lm_loss((logits_of(model, batch),), batch.labels, batch.num_valid).backward()
    return {n: float(p.grad.abs().max()) for n, p in model.named_parameters() if p.grad is not None}


def test_latent_attention_tiny_configs_keep_kv_heads_and_rotary_width() -> None:
    defaults = {"num_attention_heads": 128, "num_key_value_heads": 128, "head_dim": 64,
                "qk_rope_head_dim": 64, "kv_lora_rank": 512}
    assert tiny_overrides(defaults) == {"num_attention_heads": 4, "num_key_value_heads": 4,
                                        "head_dim": 4, "qk_rope_head_dim": 4, "kv_lora_rank": 16}
    assert _gradients("deepseek_v2")  # K/V heads 2 of 4 heads: eager attention fails on shapes


def test_heterogeneous_config_is_read_per_layer() -> None:
    """DOTS3's global config refuses the attributes that differ per layer (heads, ...): planning
    reads each layer's own. Its tiny sliding layers are tiny too (64 heads of 256 by default)."""
    assert [layer.self_attn.num_heads for layer in build_tiny("dots3_note_text").model.layers] == [4, 4]
    model = build_tiny("dots3_note_text", per_layer_config={1: {"num_attention_heads": 2,
                                                                "num_key_value_heads": 2}})
    spec = inspect_model(model)
    heads = {m.path: dict(m.facts)["n_heads"] for m in spec.modules if "attention" in m.roles}
    assert heads == {"model.layers.0.self_attn": 4, "model.layers.1.self_attn": 2}
    assert plan_row("dots3_note_text").plans


@pytest.mark.parametrize("family", sorted(REASONS))
def test_refused_families_say_why(family: str) -> None:
    with pytest.raises(PlanError) as caught:
        inspect_model(build_tiny(family))
    problem = caught.value.problems[0]
    assert problem.message == f"transformers MoE family {family!r} is not supported"
    assert problem.value == REASONS[family] and "docs/models.md" in problem.fix


class _Crashing:
    name = "crashing"

    def recognise(self, model: nn.Module) -> Recognition | None:
        raise ZeroDivisionError("a bug")


@pytest.fixture
def crashing() -> Iterator[None]:
    recogniser = _Crashing()
    register_recogniser(recogniser)
    yield
    RECOGNISERS.remove(recogniser)


def test_a_crashing_recogniser_is_a_typed_refusal(crashing: None) -> None:
    with pytest.raises(PlanError, match=r"the crashing recogniser failed on this model \(value: "
                                        r"ZeroDivisionError: a bug\)"):
        inspect_model(nn.Linear(2, 2))


def test_zaya_keys_get_gradients() -> None:
    """Zaya scales its keys by ``qk_norm.temp``, zeros at init: uniform attention, no gradient
    for q/k even in one process; the sweep's models start it at one."""
    grads = _gradients("zaya")
    assert min(v for n, v in grads.items() if "q_proj" in n or "k_proj" in n) > 0
    assert all(float(p.detach().abs().min()) == 1.0 for n, p in build_hf("zaya").named_parameters()
               if n.endswith("qk_norm.temp"))


def test_sampled_routing_is_compared_with_routers_in_eval_mode() -> None:
    """PhiMoE's sparsemixer samples experts in training (Gumbel noise), which no two processes
    draw alike; the sweep's models route it by argmax, so the random state does not matter."""
    model = build_hf("phimoe")
    batch = hf_batch(int(model.config.vocab_size), 4, 16, 0)  # in training, seeds 1, 2 differ by 1e-2
    runs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        runs.append(logits_of(model, batch).detach())
    assert torch.equal(*runs) and model.training


def test_flint_tiny_model_has_experts() -> None:
    """Flint's first two layers are dense by default: the tiny model keeps one dense layer."""
    assert len(inspect_model(build_tiny("flint")).paths_with("experts")) == 1


def test_dots1_tiny_model_builds() -> None:
    assert plan_row("dots1").plans and isinstance(build_tiny("dots1"), nn.Module)

