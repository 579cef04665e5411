"""All ranks agree before any rank changes anything: no rank may enter a collective alone."""

from __future__ import annotations

import torch.distributed as dist

from moefn.plan.errors import Problem, RealizeError

Digests = tuple[tuple[str, int | None], ...]
"""(tensor name, value digest or None for meta) — see `moefn.realize.digest.value_digests`."""


def _shown(digest: int | str | None) -> str:
    return "meta (no values)" if digest is None else f"digest {digest}"


def _value_problems(digests: list[Digests]) -> list[Problem]:
    """The first tensor whose values differ between ranks (every rank must hold the same model)."""
    for index, (name, mine) in enumerate(digests[0]):
        for rank, theirs in enumerate(digests[1:], start=1):
            other = theirs[index][1] if index < len(theirs) else "missing"
            if other != mine:
                return [Problem(path=name, message="ranks hold different values",
                                value=f"rank 0 {_shown(mine)}, rank {rank} {_shown(other)}",
                                fix="build the model with the same seed on every rank "
                                    "(torch.manual_seed before construction) or on the meta "
                                    "device everywhere, then load one checkpoint")]
    return []


def agree(plan_fingerprint: str, problems: list[Problem], digests: Digests = ()) -> None:
    """Exchange (fingerprint, problems, value digests) over the world with one
    ``all_gather_object``; raise the same error on every rank.

    Every rank raises if any rank found a problem, if the ranks hold different plans or if their
    models' values differ, so all ranks stop together instead of hanging (or training a silent
    mix of models) after realize.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if problems:
            raise RealizeError(problems)
        return
    gathered: list[tuple[str, list[Problem], Digests]] = [("", [], ())] * dist.get_world_size()
    dist.all_gather_object(gathered, (plan_fingerprint, problems, digests))
    everyone: list[Problem] = []
    prints = set()
    for rank, (fp, found, _) in enumerate(gathered):
        prints.add(fp)
        everyone += [Problem(path=p.path, message=f"rank {rank}: {p.message}", value=p.value,
                             fix=p.fix) for p in found]
    if len(prints) > 1:
        everyone.append(Problem(path="", message="ranks hold different plans or models",
                                value=f"{len(prints)} distinct fingerprints",
                                fix="build the same plan and model on every rank"))
    if not everyone:
        everyone = _value_problems([d for _, _, d in gathered])
    if everyone:
        raise RealizeError(everyone)
