"""Adapters on a frozen base model: the LoRA / DoRA runtime (`lora`: LoRAConfig, add_lora, named adapters,
merge_lora; `layer`: the LoRALinear module), PEFT's adapter folder format (`peft_io`: save_peft, load_peft),
re-quantizing merges (`merge`) and the training methods (`methods`). The math lives in slimlm.core.lora."""
