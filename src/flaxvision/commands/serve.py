"""`flaxvision serve`: an HTTP server over a model, with dynamic batching (flaxvision.ship.server)."""

from __future__ import annotations

import argparse
import errno
import signal
import socket
import sys
import threading

from flaxvision.errors import FlaxvisionError

EPILOG = """examples:
  flaxvision serve runs/food                                 # http://127.0.0.1:8080
  flaxvision serve runs/food/model --port 9000 --max-batch 16 --max-wait-ms 10
  curl -F image=@cat.jpg -F image=@dog.jpg 'http://127.0.0.1:8080/predict?top_k=3'
  curl --data-binary @cat.jpg -H 'Content-Type: image/jpeg' http://127.0.0.1:8080/predict"""

MAX_BATCH = 1024


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "serve", help="serve a model over HTTP (POST /predict)", epilog=EPILOG,
        description="An HTTP server over a model: POST /predict (multipart files or one raw image; JSON as predict\n"
                    "--json), GET /health, GET /metadata. Requests are batched on the device, up to --max-batch\n"
                    "images, waiting at most --max-wait-ms for a batch to fill. SIGTERM stops it gracefully: no new\n"
                    "connections, the requests in flight are answered, exit 0.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("model", metavar="MODEL_OR_RUN", help="a run directory, a model directory or a Hub id")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=8080, help="TCP port (0: any free one, printed when ready)")
    parser.add_argument("--max-batch", type=int, default=32, help="most images in one device batch (default 32)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="how long a batch waits for more images after its first one (default 5)")  # fmt: skip
    parser.add_argument("--top-k", type=int, default=5, help="predictions per image (default 5; ?top_k= per request)")
    parser.add_argument("--weights", choices=("raw", "ema"), default="raw",
                        help="a run trained with --ema-decay: its raw weights (default) or their EMA")  # fmt: skip
    parser.add_argument("--max-request-mb", type=float, default=20.0,
                        help="largest request body (default 20; 413 above)")  # fmt: skip
    parser.add_argument("--max-image-pixels", type=int, default=40_000_000,
                        help="largest image, width x height by its header (default 40M; 413 above)")  # fmt: skip
    parser.add_argument("--max-images", type=int, default=64,
                        help="most images in one request (default 64; 413 above)")  # fmt: skip
    parser.add_argument("--decode-threads", type=int, default=4,
                        help="threads decoding and resizing images (default 4)")  # fmt: skip
    parser.add_argument("--access-log", action="store_true", help="log every request (uvicorn's access log)")
    parser.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad flags before anything is imported or loaded."""
    from flaxvision.data.transforms import DEFAULT_MAX_IMAGE_PIXELS

    if not 0 <= args.port <= 65535:
        raise FlaxvisionError(f"--port must be in 0..65535 (0: any free port), got {args.port}")
    if not 1 <= args.max_batch <= MAX_BATCH:
        raise FlaxvisionError(f"--max-batch must be in 1..{MAX_BATCH}, got {args.max_batch}")
    if not 0 <= args.max_wait_ms <= 10_000:
        raise FlaxvisionError(f"--max-wait-ms must be in 0..10000, got {args.max_wait_ms:g}")
    if args.top_k < 1:
        raise FlaxvisionError(f"--top-k must be >= 1, got {args.top_k}")
    if not 0 < args.max_request_mb <= 4096:
        raise FlaxvisionError(f"--max-request-mb must be in (0, 4096], got {args.max_request_mb:g}")
    if not 1 <= args.max_image_pixels <= 2 * DEFAULT_MAX_IMAGE_PIXELS:
        raise FlaxvisionError(f"--max-image-pixels must be in 1..{2 * DEFAULT_MAX_IMAGE_PIXELS} (Pillow refuses "
                              f"larger images), got {args.max_image_pixels}")  # fmt: skip
    if args.max_images < 1:
        raise FlaxvisionError(f"--max-images must be >= 1, got {args.max_images}")
    if not 1 <= args.decode_threads <= 256:
        raise FlaxvisionError(f"--decode-threads must be in 1..256, got {args.decode_threads}")


def bind(host: str, port: int) -> socket.socket:
    """The listening address, taken before the model loads: a port in use is a one-line error at once."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise FlaxvisionError(f"--host {host!r} is not an address of this machine ({err.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may reuse a port in TIME_WAIT
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE:
            raise FlaxvisionError(f"port {port} on {host} is already in use; stop what listens there or pass "
                                  "another --port (--port 0 picks a free one)") from None  # fmt: skip
        raise FlaxvisionError(f"cannot listen on {host}:{port}: {err.strerror}; pass another --host/--port") from None
    return sock


def run(args: argparse.Namespace) -> int:
    check_args(args)
    try:
        import fastapi  # noqa: F401
        import python_multipart  # noqa: F401
        import uvicorn
    except ImportError as err:
        raise FlaxvisionError(f"serve needs FastAPI and uvicorn ({err.name} is missing): "
                              "pip install 'flaxvision[serve]'") from None  # fmt: skip
    sock = bind(args.host, args.port)
    try:
        from flaxvision.commands.common import load_model
        from flaxvision.ship.server import ServeSettings, Service, create_app

        settings = ServeSettings(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, top_k=args.top_k,
                                 max_request_mb=args.max_request_mb, max_image_pixels=args.max_image_pixels,
                                 max_images=args.max_images, decode_threads=args.decode_threads)  # fmt: skip
        service = Service(load_model(args.model, weights=args.weights), settings, source=args.model)
        service.batcher.warm_up()  # every bucket compiled before the first request
        config = uvicorn.Config(create_app(service), log_level="info" if args.access_log else "warning",
                                access_log=args.access_log, timeout_graceful_shutdown=60,
                                timeout_keep_alive=5)  # fmt: skip
        server = uvicorn.Server(config)
        sock.listen(2048)  # connections wait in the backlog from here on, until uvicorn accepts them
        host, port = sock.getsockname()[:2]
        url_host = f"[{host}]" if ":" in host else host
        buckets = ",".join(map(str, service.batcher.buckets))
        print(f"flaxvision: serving {args.model} on http://{url_host}:{port} (buckets {buckets}; POST /predict, "
              "GET /health, GET /metadata)", flush=True)  # fmt: skip
        # uvicorn handles SIGTERM/SIGINT (stop accepting, finish in-flight requests, lifespan shutdown) and then
        # raises the signal again under the handler it found; for SIGTERM that is this no-op, so the graceful
        # stop ends with exit 0 instead of the default action's death by signal.
        main = threading.current_thread() is threading.main_thread()  # only there can signals be handled
        previous = signal.signal(signal.SIGTERM, lambda *_: None) if main else None
        try:
            server.run(sockets=[sock])
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)
        print("flaxvision: server stopped", file=sys.stderr, flush=True)
        return 0
    finally:
        sock.close()
