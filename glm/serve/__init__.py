"""An OpenAI-compatible HTTP server over the decoding engine: `python -m glm.serve --help` (`glm-serve`).

Endpoints: `POST /v1/completions` (OpenAI's legacy completions: prompt text with `[MASK]`/`[sMASK]`/`[gMASK]`,
`[gMASK]` appended when it has none; the completion fills the first blank of the highest-priority kind),
`POST /v1/fill` (this project's blank filling: every blank, each returned), `POST /v1/chat/completions`
(OpenAI's chat over a prompt template: chat.py), `GET /v1/models`, `GET /health`, the tokenizer in vLLM's
shapes (`GET /tokenizer_info`, `POST /tokenize`, `POST /detokenize`: tokenize.py), and the playground page at
`/` (playground.py, static/).
Every decode step batches all running requests (continuous batching: a request joins at the next step and
leaves when done). A full queue answers 429, a bad request 400 naming the field, a missing or wrong key 401
(with --api-key); a client that disconnects frees its rows; SIGTERM lets in-flight requests finish.

- glm/cli/serve.py  the command line (no torch)
- protocol.py  request bodies parsed and checked, error bodies, completion and fill responses
- service.py   the engine on its own thread; HTTP requests turned into engine requests
- app.py       the FastAPI routes
- chat.py      the chat template, and chat requests and responses
- echo.py      token-id prompts, and echoed prompts scored (`echo` with `logprobs`, `max_tokens: 0`)
- tokenize.py  the tokenizer endpoints
- playground.py  the playground page's routes (its files: static/)

Importing this package imports neither torch nor FastAPI; `main` loads them.
"""

from __future__ import annotations

import argparse
import os
import sys

from glm.api import load_from_args, run_cli
from glm.cli.serve import build_parser

__all__ = ["build_parser", "cli", "main"]


def main(args: argparse.Namespace) -> int:
    import uvicorn

    from glm import distributed
    from glm.decoding.engine import Engine
    from glm.serve.app import create_app
    from glm.serve.service import Service

    for name in ("groups", "width", "max_queue"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    parallel = distributed.current()
    if parallel.data_parallel_size > 1:
        raise ValueError("glm-serve runs one model replica: launch tensor-parallel-size processes")
    model, tokenizer = load_from_args(args)
    max_length = args.max_length or model.config.max_sequence_length
    if not 2 < max_length <= model.config.max_sequence_length:
        raise ValueError(f"--max-length must be in 3..{model.config.max_sequence_length}, got {max_length}")
    engine = Engine(
        model,
        groups=args.groups,
        width=args.width,
        max_length=max_length,
        detokenize=tokenizer.detokenize,
        compile=args.compile,
        cuda_graphs=args.cuda_graphs,
    )
    name = args.model_name or os.path.basename(os.path.normpath(args.checkpoint))
    service = Service(engine, tokenizer, name, max_queue=args.max_queue)
    if not parallel.is_main:  # rank 0 serves HTTP; the others run the same steps
        service.follow()
        return 0
    app = create_app(service, api_key=args.api_key or os.environ.get("GLM_API_KEY"))
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=600
    )
    server = uvicorn.Server(config)
    service.on_failure = lambda: setattr(server, "should_exit", True)  # from the engine thread
    # the startup line: where the playground (and the API under /v1) answers
    print(f"glm-serve: {name} on http://{args.host}:{args.port}/ (playground; API under /v1)", flush=True)
    server.run()
    if service.failure is not None:
        print(f"error: the engine failed, so the server stopped: {service.failure}", file=sys.stderr)
        return 1
    return 0 if server.started else 3  # uvicorn.run's status when the server did not start


def cli() -> None:
    run_cli(main, build_parser().parse_args())
