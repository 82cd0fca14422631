"""Server-side algorithms, one module per family, each a Flower Message-API Strategy.

Flower's own strategies (FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedMedian, FedTrimmedAvg,
Krum, MultiKrum, Bulyan) are used directly from ``flwr.serverapp.strategy`` by config.
:mod:`strategies.common` holds the base class fedsim's own strategies share.
"""
