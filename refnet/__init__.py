"""refnet — a manual-backprop MLP beside its autograd twin, verified example by example."""
__version__ = "0.1.0"
