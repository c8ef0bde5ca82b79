"""Training: the recipe (config, optimiser, schedule, loss, step, evaluation),
the two stages' crops, and run directories with their checkpoints."""
