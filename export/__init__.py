"""quickstep.export."""
