"""HART (mit-han-lab/hart): the second model family, behind the same interfaces as Infinity.

config.py (sizes), model.py (the transformer: text prefix in self-attention, block-causal over [text | scales]),
checkpoint.py (strict official keys), text.py (Qwen2 prompts), tokenizer.py (VQ decoder + multi-scale residual
quantizer), diffusion.py (the residual diffusion MLP and its IDDPM sampler).
"""
