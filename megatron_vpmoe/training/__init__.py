"""The training loop: data, optimizer, checkpoints, exact resume, preemption."""
