"""quickstep.train.eval."""
