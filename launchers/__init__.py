"""Submit seerlike stages through submitit: Slurm or one machine."""
