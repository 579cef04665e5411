"""Analysis of a plan, without devices: local shapes, memory, communication, the diff text,
and `ledger`, which counts a real run's collectives to check the prediction."""
