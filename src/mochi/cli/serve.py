"""`mochi serve`: the web UI and HTTP API."""

from __future__ import annotations

import argparse
import os

from mochi.cli.options import Subparsers, add_model_options, pipeline_options
from mochi.serve.limits import CPU_MAX_PIXELS, MAX_PIXELS


def _add_serve(sub: Subparsers) -> None:
    p = sub.add_parser(
        "serve",
        help="run the web UI and HTTP API",
        description=(
            "Serve a web UI and an HTTP API (OpenAPI at /openapi.json) on one port. Jobs run one at a time "
            "per device; others wait in a bounded queue. Videos and their JSON parameters go to --out-dir. "
            "Binding to anything other than loopback needs a bearer token (--token or MOCHI_SERVE_TOKEN). "
            "Needs the serve extra: pip install 'mochi-video[serve]'."
        ),
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument(
        "--token",
        default=os.environ.get("MOCHI_SERVE_TOKEN"),
        help="bearer token every API call must carry, 16+ visible ASCII characters (default: "
        "$MOCHI_SERVE_TOKEN); required off loopback",
    )
    p.add_argument(
        "--out-dir",
        default="mochi-serve-out",
        metavar="DIR",
        help="where videos and their JSON parameters are written (default: mochi-serve-out)",
    )
    p.add_argument("--queue-size", type=int, default=8, metavar="N", help="jobs that may wait (default: 8)")
    p.add_argument("--lora-dir", metavar="DIR", help="folder of LoRA .safetensors files offered in the UI")
    p.add_argument("--fps", type=float, default=30.0, help="frame rate of the written videos, 0.1-240 (30)")
    p.add_argument(
        "--max-pixels",
        type=int,
        metavar="N",
        help=f"most frames x height x width per job; more is refused (default: {MAX_PIXELS} = 163x720x1280 "
        f"on a GPU, {CPU_MAX_PIXELS} = 25x128x128 on a CPU)",
    )
    p.add_argument(
        "--max-pixel-steps",
        type=int,
        metavar="N",
        help="most frames x height x width x steps per job (default: the above at 64 steps)",
    )
    add_model_options(p, runtime=True)
    p.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> int:
    try:
        from mochi.serve.api import create_app
        from mochi.serve.jobs import JobManager
        from mochi.serve.server import check_binding, check_options, check_port, run
    except ImportError as e:
        raise ValueError(
            f"mochi serve needs the serve extra ({e.name} is missing): pip install 'mochi-video[serve]'"
        ) from None
    check_binding(args.host, args.token)
    check_port(args.host, args.port)
    check_options(args.out_dir, args.queue_size, args.fps)
    if any(v is not None and v < 1 for v in (args.max_pixels, args.max_pixel_steps)):
        raise ValueError("--max-pixels and --max-pixel-steps must be positive")
    if args.lora_dir and not os.path.isdir(args.lora_dir):
        raise ValueError(f"--lora-dir {args.lora_dir!r} is not a folder")
    from mochi.video import video_rate

    video_rate(args.fps)  # now, not at the first job

    from mochi.pipeline import MochiPipeline

    pipe = MochiPipeline.from_pretrained(args.model, device=args.device, **pipeline_options(args))
    limits = {"max_pixels": args.max_pixels, "max_pixel_steps": args.max_pixel_steps}
    jobs = JobManager(pipe, args.out_dir, queue_size=args.queue_size, fps=args.fps, **limits)
    app = create_app(jobs, token=args.token, lora_dir=args.lora_dir)

    def ready(address: str) -> None:
        print(f"mochi serve: model {pipe.components.name} on {pipe.device}; open {address}", flush=True)

    try:
        # Event streams end and queued jobs are cancelled as the shutdown begins, not after it.
        run(app, args.host, args.port, ready=ready, stopping=lambda: jobs.close(timeout=0))
    finally:
        jobs.close()
    return 0


# The registrars of this module's sub-commands, in the order `mochi --help` lists them.
COMMANDS = (_add_serve,)
