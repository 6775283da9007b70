"""Training: distributed facts, objective, optimisation, checkpoints, the loop and SCST."""
