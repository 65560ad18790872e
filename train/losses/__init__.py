"""quickstep.train.losses."""
