"""Hand-written kernels where XLA's own code falls short on a shape that matters (see each module)."""
