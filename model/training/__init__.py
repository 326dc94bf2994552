"""Training SpaSemSR: the trainer, its torch-free config, the degradations."""
