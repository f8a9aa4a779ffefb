"""idlegrid gateway: the OpenAI-compatible front door over a fleet of GPU workers."""
