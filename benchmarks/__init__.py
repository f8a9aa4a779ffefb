"""idlegrid bench: latency, goodput, tokens/s and tokens per joule against any OpenAI endpoint."""
