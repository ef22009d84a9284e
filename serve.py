"""Serve the deepfake detector over HTTP: a JSON API and a web page, the model loaded once.

    python serve.py                                   # http://127.0.0.1:8000/ : the page; the shipped weights/
    python serve.py --host 0.0.0.0 --port 8080 --workers 2 --queue 16 --weights runs/my_weights
    curl -F file=@demo/dfdc_fake_1.jpg http://127.0.0.1:8000/v1/score

Routes: ``GET /health`` (200 once the model is loaded, 503 while it loads), ``POST /v1/score`` (multipart
field ``file``, an image, or a video where the video module is installed; ``?heatmap=1`` adds a heatmap) ->
``{"prob", "verdict", "threshold", "experts": {name: prob}}``, the numbers ``infer.py`` prints for the same
file; ``GET /`` the web page. Errors are ``{"error": "..."}``: 400 empty or damaged file, 413 too many bytes
or pixels, 415 not an image, 422 no ``file`` field, 503 busy (with Retry-After) or loading, 504 too slow.

Load: --workers threads run the model (torch's CPU threads are split between them unless --threads says);
each takes up to --batch-size queued images into one forward pass. At most workers x batch-size requests
are scored at once and --queue wait; past that a request is refused at once with 503 and Retry-After, so
memory stays bounded. Ctrl-C or SIGTERM stops the server cleanly.
"""
from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Sequence

DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="weights folder (default: the shipped weights/)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto, the GPU if any)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads (default: 0, the CPUs divided between the --workers)")
    p.add_argument("--workers", type=int, default=1, help="scoring threads running the model (default: 1)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="queued images a worker scores in one forward pass (default: 8)")
    p.add_argument("--queue", type=int, default=8,
                   help="requests that may wait for a worker; more get 503 at once (default: 8)")
    p.add_argument("--max-bytes", type=int, default=25 * 2**20,
                   help="largest upload in bytes, refused (413) while streaming (default: 26214400, 25 MiB)")
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds from a request's arrival to its answer; later is 504 (default: 30)")
    p.add_argument("--video-frames", type=int, default=16,
                   help="frames sampled per uploaded video, evenly spaced (default: 16; all of a shorter video)")
    p.add_argument("--video-agg", default="mean", choices=("mean", "max", "topk"),
                   help="a video's probability from its frames': mean, max, or topk = the mean of the top "
                        "quarter (default: mean)")
    p.add_argument("--quiet", action="store_true", help="no access log line per request")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.workers, args.batch_size, args.queue, args.max_bytes, args.video_frames) < 1 or args.threads < 0 \
            or args.timeout <= 0 or not 0 <= args.port <= 65535:
        print("error: --workers, --batch-size, --queue, --max-bytes and --video-frames must be at least 1, "
              "--threads at least 0, --timeout positive, --port in 0..65535", file=sys.stderr)
        return 2
    import logging

    import uvicorn

    from experts import WeightsError
    from service.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    try:
        app = create_app(args.weights, device=args.device, threads=args.threads, workers=args.workers,
                         queue=args.queue, batch_size=args.batch_size, max_bytes=args.max_bytes,
                         timeout=args.timeout, video_frames=args.video_frames, video_agg=args.video_agg)
    except (WeightsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # uvicorn shuts down gracefully on SIGINT and SIGTERM, then raises the signal again to the handler it found:
    # this one notes it, so that a stop asked for is a clean exit (status 0), not a KeyboardInterrupt or a kill.
    stops: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda number, frame: stops.append(number))
    # One process: the model is loaded once and shared by the scoring threads (--workers is not uvicorn's).
    uvicorn.run(app, host=args.host, port=args.port, access_log=not args.quiet, log_level="info",
                timeout_graceful_shutdown=10)
    if stops:
        print(f"stopped by {signal.Signals(stops[0]).name}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
