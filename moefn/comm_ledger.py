"""`moefn.comm_ledger` moved to `moefn.analyse.ledger` (analysis); this path keeps working."""

from moefn.analyse.ledger import CommLedger, Traffic

__all__ = ["CommLedger", "Traffic"]
