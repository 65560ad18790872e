"""quickstep.serve.routes."""
