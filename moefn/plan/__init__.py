"""Planning: pure, frozen records and the stages that produce them (imports nothing else of moefn).

`records` (ShardPlan and its steps), `mesh` (MeshSpec), `spec` (ModelSpec, `inspect_model`),
`roles` with `reference_roles` and `hf_roles` (recognisers), `options` (what each stage was
called with), `stages` (plan_cp, plan_tp, plan_ep, plan_ac, plan_fsdp, stages_from), `compose`,
`serialize` (JSON), `dtypes` (names and sizes), `errors` and `arguments` (what every other
package reports with).
"""
