"""`tokenmill quantize`: calibrated weight-only quantization (RTN, GPTQ, AWQ) of a float or GGUF
model, written as a GPTQ, AWQ or compressed-tensors checkpoint (formats in model/packed)."""
