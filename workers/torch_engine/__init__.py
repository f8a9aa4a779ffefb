"""A real engine for real GPUs: a random-weight Llama-shaped model in plain torch,
served with the simulated engine's scheduler and vLLM API (see engine.py).

    python -m workers.torch_engine --config 8b --max-num-seqs 128 --port 8100

For measuring what a GPU really draws (NVML energy, tokens per joule) where no
vLLM build or model weights are at hand. torch is imported on use: the rest of
idlegrid does not need it.
"""
