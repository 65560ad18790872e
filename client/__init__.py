"""quickstep.client."""
