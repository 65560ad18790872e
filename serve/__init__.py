"""quickstep.serve."""
