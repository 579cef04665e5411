"""Planning: pure, frozen records and the stages that produce them (imports nothing else of moefn).

`records` (ShardPlan and its steps), `mesh` (MeshSpec), `spec` (ModelSpec, `inspect_model`),
`roles` with `reference_roles` and `hf_roles` (recognisers), `stages` (plan_cp, plan_ep,
plan_ac, plan_fsdp), `compose`, `serialize` (JSON), `dtypes` (names and sizes), `errors` and
`arguments` (what every other package reports with).
"""
