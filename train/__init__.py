"""quickstep.train: TrigFlow teachers and consistency students."""
