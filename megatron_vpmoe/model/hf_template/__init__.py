"""Self-contained Hugging Face remote code for VPMoE, copied next to converted checkpoints."""
