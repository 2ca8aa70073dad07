"""Pre-training small causal LMs from scratch with and without a dedicated sink token (issue 13).

Xiao et al. 2023 (StreamingLLM), section 3.3: a model pre-trained with one learnable placeholder token at the
start of every sample needs only that token as an attention sink when streaming. This package scales the
recipe down to a 2-core CPU: a byte-level BPE tokenizer (`tokenizer`), Canterbury + Loghub text with a
held-out split (`data`), a small Llama config (`config`), a resumable training loop with safetensors
checkpoints (`loop`), and the evaluation through sinkstream's own sink cache (`study`).
"""
