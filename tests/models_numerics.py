"""``nox -s models``: every family of docs/models.md that plans EP + router AC + FSDP trains on 4
gloo ranks (dp_shard=4, ep=2) as in one process; the results go into the numerics column.

Run from a checkout: ``python -m tests.models_numerics [family ...]`` (all planning families by
default).
"""

from __future__ import annotations

import datetime
import sys

from moefn.adapters.transformers import catalogue
from moefn.plan.options import ACOptions, EPOptions, FSDPOptions
from tests.hf_parity import SAMPLED_ROUTING, HFCase, assert_hf_parity, run_hf_parity
from tests.ranks import RankPool

STAGES = (EPOptions(dispatch="all_to_all"), ACOptions(mode="router"),
          FSDPOptions(precision="fp32"))


def check(pool: RankPool, family: str, today: str) -> str:
    """The numerics cell of ``family``: matched, or the first line of what went wrong."""
    case = HFCase(family=family, mesh=catalogue.EP_MESH, stages=STAGES)
    try:
        for result in pool.run(run_hf_parity, case):
            assert_hf_parity(result)
    except Exception as error:  # a mismatch or a crash on some rank: the finding for this row
        lines = [line for line in str(error).splitlines() if line.strip()]
        return catalogue.cell(f"differs: {type(error).__name__}: {lines[-1] if lines else ''}")[:300]
    sampled = " (routers in eval mode: training samples experts)" if family in SAMPLED_ROUTING else ""
    return f"matches one process{sampled}: `nox -s models` ({today})"


def main(argv: list[str]) -> int:
    rows = catalogue.write()
    families = argv or [row.family for row in rows if row.plans]
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    pool = RankPool(4)
    results = {}
    try:
        for family in families:
            results[family] = check(pool, family, today)
            print(f"{family}: {results[family]}", flush=True)
    finally:
        pool.close()
    catalogue.write(results)
    return 0 if all(r.startswith("matches") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
