"""The nano world: an embedded few-step model, its data and its evaluators, small enough for a CPU."""
