"""Federated algorithms: server-side plans and aggregation, client-side local training."""
