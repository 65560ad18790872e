"""quickstep.train.configs."""
