"""moefn: plan Mixture-of-Experts parallelism as data, apply it once."""
