"""glm-serve's command line (no torch: `--help` answers before it loads)."""

from __future__ import annotations

import argparse

from glm.cli.common import ArgumentParser, add_model_arguments

DESCRIPTION = (
    "An OpenAI-compatible HTTP server over the decoding engine: `python -m glm.serve --help` (`glm-serve`)."
)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="glm-serve", description=DESCRIPTION)
    add_model_arguments(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    server.add_argument("--port", type=int, default=8000, help="TCP port")
    server.add_argument(
        "--model-name", help="the model id clients send (default: the checkpoint's folder name)"
    )
    server.add_argument(
        "--api-key",
        help="require 'Authorization: Bearer KEY' (default: the GLM_API_KEY environment variable, else none)",
    )
    engine = parser.add_argument_group("engine")
    engine.add_argument("--groups", type=int, default=4, help="row groups of the KV cache")
    engine.add_argument("--width", type=int, default=4, help="rows per group: the largest n or num_beams")
    engine.add_argument("--max-length", type=int, help="positions per row (default: the model's maximum)")
    engine.add_argument("--max-queue", type=int, default=64, help="requests waiting for rows before 429")
    engine.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    engine.add_argument("--cuda-graphs", action="store_true", help="compile with CUDA graphs (GPU)")
    return parser
