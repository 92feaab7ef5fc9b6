"""Knowledge distillation from a teacher (phase 1 off-policy, phase 2 on-policy)."""
