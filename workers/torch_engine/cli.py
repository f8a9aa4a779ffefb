"""`python -m workers.torch_engine`: serve a random-weight Llama-shaped model on a GPU (or the CPU)
with vLLM's API, so a real GPU does real transformer work where no vLLM build or weights are at hand."""

from __future__ import annotations

import argparse
import asyncio
import sys

from workers.sim.server import SimServer, serve_until_signalled

from .engine import DTYPES, TorchConfig, TorchEngine
from .model import CONFIGS, get_config
from .server import build_app


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny",
                        help=f"model shape: {', '.join(f'{n} ({c.params / 1e9:.2f}B params)' for n, c in CONFIGS.items())} (default tiny)")
    parser.add_argument("--device", default="auto", help="cuda, cuda:N or cpu (default: cuda if torch sees a GPU, else cpu)")
    parser.add_argument("--dtype", choices=list(DTYPES), help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--port", type=int, default=8100, help="port (default 8100; 0 picks a free one)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="sequences per batch, as vLLM's flag (default 64)")
    parser.add_argument("--max-model-len", type=int, default=2048,
                        help="context length; the KV cache holds max-num-seqs x this many tokens (default 2048)")
    parser.add_argument("--served-model-name", default=None, help="model id to serve as (default torch-CONFIG)")
    parser.add_argument("--api-key", default=None, help="require this Bearer key on /v1 endpoints, like vLLM's --api-key")
    parser.add_argument("--log-level", default="warning", help="uvicorn log level (default warning)")


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        print("torch engine: --port must be in 0..65535", file=sys.stderr)
        return 2
    try:
        get_config(args.config)
        engine = TorchEngine(TorchConfig(
            model=args.config, device=args.device, dtype=args.dtype, host=args.host, port=args.port, seed=args.seed,
            max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
            served_model_name=args.served_model_name, api_key=args.api_key,
        ))
    except ValueError as exc:
        print(f"torch engine: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # CUDA out of memory, no usable GPU, ...
        print(f"torch engine: cannot build the model: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(_serve(engine, args.log_level))
    except OSError as exc:
        print(f"torch engine: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


async def _serve(engine: TorchEngine, log_level: str) -> int:
    server = SimServer([engine], log_level=log_level, app_for=build_app)
    await server.start()
    shape = engine.model.shape
    print(
        f"torch engine: {engine.model_name} ({shape.params / 1e9:.2f}B params, random weights, "
        f"{str(engine.dtype).removeprefix('torch.')}) on {engine.gpu.id} ({engine.gpu.name}), built in "
        f"{engine.build_seconds:.1f}s; KV cache {engine.runner.kv_cache_bytes / 2**30:.1f} GiB for "
        f"{engine.config.max_num_seqs} x {engine.max_model_len} tokens; serving at {engine.url}",
        flush=True,
    )
    await serve_until_signalled(server)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.torch_engine", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
