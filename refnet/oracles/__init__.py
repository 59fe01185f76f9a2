"""Independent oracles that share no code with manual/ or the twin."""
