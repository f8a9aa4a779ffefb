"""idlegrid workers: the agent that runs beside each GPU, and the simulated engine."""
