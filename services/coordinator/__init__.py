"""The coordinator service: Pilot's Flower ServerApp (rounds, aggregation, checkpoints, control API)."""
