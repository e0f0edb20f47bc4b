"""Optional integrations, imported on demand: PEFT LoRA on block-diagonal layers (``lora``) and int8 quantization
through torch.ao and torchao (``quantize``)."""
