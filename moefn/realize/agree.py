"""All ranks agree before any rank changes anything: no rank may enter a collective alone."""

from __future__ import annotations

import torch.distributed as dist

from moefn.errors import Problem, RealizeError


def agree(plan_fingerprint: str, problems: list[Problem]) -> None:
    """Exchange (fingerprint, problems) over the world; raise the same error on every rank.

    Every rank raises if any rank found a problem or if the ranks hold different plans, so all
    ranks stop together instead of hanging in the first collective of realize.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        if problems:
            raise RealizeError(problems)
        return
    gathered: list[tuple[str, list[Problem]]] = [("", [])] * dist.get_world_size()
    dist.all_gather_object(gathered, (plan_fingerprint, problems))
    everyone: list[Problem] = []
    prints = set()
    for rank, (fp, found) in enumerate(gathered):
        prints.add(fp)
        everyone += [Problem(path=p.path, message=f"rank {rank}: {p.message}", value=p.value,
                             fix=p.fix) for p in found]
    if len(prints) > 1:
        everyone.append(Problem(path="", message="ranks hold different plans or models",
                                value=f"{len(prints)} distinct fingerprints",
                                fix="build the same plan and model on every rank"))
    if everyone:
        raise RealizeError(everyone)
