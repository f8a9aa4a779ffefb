"""`idlegrid sim-engine`: serve one or more simulated vLLM engines from one process."""

from __future__ import annotations

import argparse
import asyncio
import sys

from .engine import SimConfig, SimEngine
from .profiles import GPUS, MODELS, ProfileError
from .server import SimServer, serve_until_signalled


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=8100, help="port of the first engine (default 8100; 0 picks a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--gpu", default="h100", help=f"GPU profile: {', '.join(GPUS)} (default h100)")
    parser.add_argument(
        "--model", default="deepseek-r1-distill-qwen-1.5b",
        help=f"model profile: {', '.join(MODELS)} (default deepseek-r1-distill-qwen-1.5b)",
    )
    parser.add_argument("--time-scale", type=float, default=1.0, help="run simulated time this many times faster (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed for requests that give none (default 0)")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="sequences per batch, as vLLM's flag (default 256)")
    parser.add_argument("--max-model-len", type=int, default=None, help="context length (default: the model's, 32768)")
    parser.add_argument("--served-model-name", default=None, help="model id to serve as (default: the model profile id)")
    parser.add_argument("--api-key", default=None, help="require this Bearer key on /v1 endpoints, like vLLM's --api-key")
    parser.add_argument("--count", type=int, default=1, help="engines to run, on ports PORT..PORT+COUNT-1 (default 1)")
    parser.add_argument(
        "--extra-latency-ms", type=float, default=0.0,
        help="add this round trip (simulated ms) to every response, to emulate a distant center",
    )
    parser.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")


def run(args: argparse.Namespace) -> int:
    try:
        engines = _engines(args)
    except (ProfileError, ValueError) as exc:
        print(f"idlegrid sim-engine: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        return runner(_serve(engines, args.log_level))
    except OSError as exc:  # the port is taken, the address is not ours, ...
        print(f"idlegrid sim-engine: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


def _engines(args: argparse.Namespace) -> list[SimEngine]:
    if args.count < 1:
        raise ValueError("--count must be at least 1")
    if args.time_scale <= 0:
        raise ValueError("--time-scale must be positive")
    if args.max_num_seqs < 1:
        raise ValueError("--max-num-seqs must be at least 1")
    if args.extra_latency_ms < 0:
        raise ValueError("--extra-latency-ms must not be negative")
    if not 0 <= args.port <= 65535 or (args.port and args.port + args.count - 1 > 65535):
        raise ValueError("--port must be in 0..65535 (and leave room for --count)")
    return [
        SimEngine(SimConfig(
            gpu=args.gpu, model=args.model, host=args.host, port=args.port + i if args.port else 0,
            time_scale=args.time_scale, seed=args.seed, max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len, served_model_name=args.served_model_name,
            api_key=args.api_key, extra_latency_ms=args.extra_latency_ms,
        ))
        for i in range(args.count)
    ]


async def _serve(engines: list[SimEngine], log_level: str) -> int:
    server = SimServer(engines, log_level=log_level)
    await server.start()
    first = engines[0]
    print(
        f"idlegrid sim-engine: {len(engines)} simulated {first.gpu.id} engine(s) serving {first.model_name} "
        f"(time scale {first.time_scale:g}, {first.perf.kv_capacity_tokens} KV tokens, "
        f"max_num_seqs {first.config.max_num_seqs}) at {', '.join(server.urls)}",
        flush=True,
    )
    await serve_until_signalled(server)
    return 0
