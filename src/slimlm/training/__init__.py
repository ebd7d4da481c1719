"""Training family: LoRA / QLoRA fine-tuning, distillation and the pieces they share (optimizers,
schedules, losses). The math lives in slimlm.core; this package holds the glue around torch.optim and
modules."""
