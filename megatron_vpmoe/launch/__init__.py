"""Launchers: SLURM sbatch scripts, torchrun, mpirun."""
