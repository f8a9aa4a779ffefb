"""The simulated engine: an honest stand-in for one GPU running vLLM's OpenAI server.

    from workers.sim import SimEngine, serve_engines
    await serve_engines([SimEngine(gpu="h100", model="deepseek-r1-distill-qwen-7b", port=8100)])

It speaks vLLM 0.32's API (chat and completions, streaming, `return_token_ids`,
/metrics, pause/resume/sleep/wake_up), schedules a continuous batch on a
roofline model of a named GPU, models power and energy, and produces R1-style
output (reasoning, then an answer) that continues exactly from any prefix of
itself. It always says it is simulated: `owned_by: "idlegrid-sim"` in the model
list, `idlegrid_sim_*` metrics and `GET /v1/sim/info`.
"""

from .engine import SimConfig, SimEngine
from .profiles import GPUS, MODELS, PerfModel, ProfileError
from .server import EnginesInThread, SimServer, build_app, serve_engines

__all__ = [
    "GPUS",
    "MODELS",
    "EnginesInThread",
    "PerfModel",
    "ProfileError",
    "SimConfig",
    "SimEngine",
    "SimServer",
    "build_app",
    "serve_engines",
]
