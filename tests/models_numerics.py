"""``nox -s models``: every family of docs/models.md that plans EP + router AC + FSDP trains on 4
gloo ranks (dp_shard=4, ep=2) as in one process, and one that also plans CP does with cp=2 too
(dp_shard=2, cp=2, ep=2); the results go into the numerics column.

Run from a checkout: ``python -m tests.models_numerics [family ...]`` (all planning families by
default).
"""

from __future__ import annotations

import datetime
import sys

from moefn.adapters.transformers import catalogue
from moefn.plan.options import ACOptions, CPOptions, EPOptions, FSDPOptions
from tests.hf_parity import SAMPLED_ROUTING, HFCase, assert_hf_parity, run_hf_parity
from tests.ranks import RankPool

STAGES = (EPOptions(dispatch="all_to_all"), ACOptions(mode="router"),
          FSDPOptions(precision="fp32"))
CP_MESH = "dp_shard=2,cp=2,ep=2"
CP_STAGES = (CPOptions(seq_len=catalogue.SEQ_LEN), *STAGES)
# families whose tiny model, in one process too, ends its second step at lr 0.5 above its first
# loss (assert_hf_parity checks that it trains)
LEARNING_RATES = {"flex_olmo": 0.1, "gemma4_text": 0.1, "kolibri1": 0.1}
# hyper-connection families: plain data parallelism without moefn already differs from one
# process by more than 1e-5 on some gradients (DeepSeek-V4's hash-routed gate), where moefn must
# stay within twice its error (assert_hf_parity)
CONTROLLED = ("deepseek_v4", "hy_v4")


def check(pool: RankPool, row: catalogue.Row, today: str) -> str:
    """The numerics cell of ``row``'s family: matched (with CP too when it plans CP), or the first
    line of what went wrong."""
    lr = LEARNING_RATES.get(row.family, 0.5)
    cases = [HFCase(family=row.family, mesh=catalogue.EP_MESH, stages=STAGES, lr=lr,
                    control=row.family in CONTROLLED)]
    if row.cp == "yes":
        cases.append(HFCase(family=row.family, mesh=CP_MESH, stages=CP_STAGES,
                            seq=catalogue.SEQ_LEN, lr=lr))
    for case in cases:
        try:
            for result in pool.run(run_hf_parity, case):
                assert_hf_parity(result)
        except Exception as error:  # a mismatch or a crash on some rank: the finding for this row
            lines = [line for line in str(error).splitlines() if line.strip()]
            return catalogue.cell(f"differs on {case.mesh}: {type(error).__name__}: "
                                  f"{lines[-1] if lines else ''}")[:300]
    sampled = " (routers in eval mode: training samples experts)" if row.family in SAMPLED_ROUTING else ""
    with_cp = f", and with CP ({CP_MESH})" if row.cp == "yes" else ""
    at_lr = f" (lr {lr})" if row.family in LEARNING_RATES else ""
    control = (" within plain data parallelism's own error (≤ 2× it where it exceeds 1e-5)"
               if row.family in CONTROLLED else "")
    return f"matches one process{control}{with_cp}{sampled}{at_lr}: `nox -s models` ({today})"


def main(argv: list[str]) -> int:
    rows = {row.family: row for row in catalogue.write()}
    families = argv or [family for family, row in rows.items() if row.plans]
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    pool = RankPool(4)
    results = {}
    try:
        for family in families:
            results[family] = check(pool, rows[family], today)
            print(f"{family}: {results[family]}", flush=True)
    finally:
        pool.close()
    catalogue.write(results)
    return 0 if all(r.startswith("matches") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
