"""`pipelinectl`: the operator's command line for the engine (start, state, watch, control)."""
