"""Training: the resumable trainer, per-task and mixed-data LoRAs."""
