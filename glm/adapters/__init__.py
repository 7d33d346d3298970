"""Parameter-efficient adapters over a loaded model: LoRA (`glm.adapters.lora`) and the adapter files that
carry one (`glm.adapters.files`). A transform like tensor parallelism or quantization: applied to a loaded
model in place, a no-op when no adapter is asked for, composing with the others (a LoRA wraps whatever
linear layer it finds: plain, quantized, sharded or streamed)."""
