"""quickstep.serve.backends."""
