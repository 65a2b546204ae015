"""Single-machine simulation: the synthetic cohort and ``flower-simulation``."""
