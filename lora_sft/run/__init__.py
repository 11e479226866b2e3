"""The run: the Trainer and its callbacks (`trainer`), the loop and its evaluations (`loop`), guards, checkpoints and
where a run starts (`start`), what it prints, tracks and plots, and the run directory (`rundir`) with its records."""
