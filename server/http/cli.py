"""The `loraserve` command: `serve`, `kernels show|refresh`, plus the client's subcommands.

Every `serve` flag mirrors a field of `Settings` (and so a LORASERVE_* variable); a flag given
on the command line wins over the environment. Nothing here imports torch until `serve` runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import types
import typing
from pathlib import Path

import pydantic

from client.cli import add_client_commands, run_client_command

from .settings import Settings

_FLAG_NAMES = {"adapters": "--adapter"}  # repeatable: --adapter NAME=PATH
# What decides which kernel plan `serve` runs: `kernels` takes these flags (and LORASERVE_* variables).
_PLAN_SETTINGS = ("model", "cache_dir", "dtype", "device", "quantization", "kernel_choice")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraserve", description="Multi-adapter LoRA inference server.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="start the server (default model if no --model)")
    _add_settings_flags(serve)
    kernels = commands.add_parser("kernels", help="the base kernels measured for this CPU and model")
    actions = kernels.add_subparsers(dest="action", required=True)
    for action, help_text in (
        ("show", "print the cached plan and the conditions it was measured under"),
        ("refresh", "measure the plan again and cache it (final only if the machine stayed quiet)"),
    ):
        _add_settings_flags(actions.add_parser(action, help=help_text), _PLAN_SETTINGS)
    adapters = add_client_commands(commands)
    compress = adapters.add_parser("compress", help="offline: rewrite a PEFT adapter at the rank it uses")
    compress.add_argument("source", help="PEFT adapter directory")
    compress.add_argument("dest", help="directory for the compressed PEFT adapter")
    compress.add_argument("--energy", type=float, help="keep this fraction of each layer's update (0 < e <= 1)")
    compress.add_argument("--max-rank", type=int, help="at most this rank per layer")
    compress.set_defaults(offline=compress_command)
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve_command(args)
    if args.command == "kernels":
        return kernels_command(args)
    if getattr(args, "offline", None):
        return args.offline(args)
    return run_client_command(args)


def compress_command(args: argparse.Namespace) -> int:
    """Needs torch, unlike the client's commands, so it lives here and imports it only when run."""
    from adapters import AdapterError  # noqa: PLC0415
    from adapters.compress import compress_dir  # noqa: PLC0415

    try:
        report = compress_dir(args.source, args.dest, energy=args.energy, max_rank=args.max_rank)
    except AdapterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report.as_dict(), indent=2))
    return 0


def kernels_command(args: argparse.Namespace) -> int:
    """Print the kernel plan `serve` with these settings runs here, measuring it first for `refresh`;
    1 where there is none, or the refresh was too noisy to replace it (it then stays provisional)."""
    from server.engine.host_memory import allocate_on_huge_pages  # noqa: PLC0415 - ctypes only

    allocate_on_huge_pages()  # measure the kernels on the pages `serve` gives them
    settings = _settings(args)
    if settings is None:
        return 2
    from .kernels_command import show_kernel_plan  # noqa: PLC0415 - torch only when run

    return show_kernel_plan(settings, refresh=args.action == "refresh")


def serve_command(args: argparse.Namespace) -> int:
    from server.engine.host_memory import allocate_on_huge_pages, limit_arenas  # noqa: PLC0415 - ctypes only

    limit_arenas()  # before any thread starts
    allocate_on_huge_pages()  # before any tensor is allocated
    settings = _settings(args)
    if settings is None:
        return 2
    from server.http.logs import configure_logging  # noqa: PLC0415 - keep `loraserve complete` free of server deps

    configure_logging(settings)
    unserved = _unserved_model(settings.model)
    if unserved is not None:
        print(f"loraserve: invalid settings: model: {unserved}", file=sys.stderr)
        return 2
    import uvicorn  # noqa: PLC0415

    from server.http.app import create_app  # noqa: PLC0415

    log = logging.getLogger(__name__)
    log.info(
        "loading %s; /ready turns 200 when it can serve", settings.model or "the default model (SmolLM2-135M-Instruct)"
    )
    failures: list[str] = []

    def on_fatal(reason: str) -> None:
        """Startup failed or the engine died: drain what can be drained, then exit non-zero."""
        log.critical("cannot serve (%s); shutting down", reason)
        failures.append(reason)
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's own graceful shutdown

    # uvicorn drains on SIGTERM, then raises the signal again, which the default handler turns into
    # death by signal (exit 143). The drain is done by then: exit 0 as the Dockerfile promises, or
    # 1 when we shut down because we could not serve.
    signal.signal(signal.SIGTERM, lambda signum, frame: _exit(failures))
    from server.http.protocol import uvicorn_options  # noqa: PLC0415

    uvicorn.run(
        create_app(settings, on_fatal=on_fatal),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=settings.shutdown_timeout,
        **uvicorn_options(settings),
    )
    return _exit_code(failures)


def _settings(args: argparse.Namespace) -> Settings | None:
    overrides = {name: value for name, value in vars(args).items() if name in Settings.model_fields}
    try:
        return Settings(**overrides)
    except pydantic.ValidationError as exc:  # a bad LORASERVE_* variable (flags are checked by argparse)
        print(f"loraserve: invalid settings: {_errors(exc)}", file=sys.stderr)
        return None


def _unserved_model(model: str | None) -> str | None:
    """Why a --model directory is of a family the engine does not serve (from its config.json alone,
    before the server starts), so it stops like any bad setting, exit 2; None when it is served or
    is not a directory (the default model, a GGUF file: those are checked as they load)."""
    if model is None or not (Path(model) / "config.json").is_file():
        return None
    from transformers import AutoConfig  # noqa: PLC0415 - keep the client commands light

    from server.engine.attention_probe import UnsupportedModelError  # noqa: PLC0415
    from server.engine.model_families import check_architecture  # noqa: PLC0415

    try:
        check_architecture(AutoConfig.from_pretrained(model))
    except UnsupportedModelError as exc:
        return str(exc)
    return None


def _errors(exc: pydantic.ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, error['loc']))}: {error['msg']}" for error in exc.errors())


def _exit_code(failures: list[str]) -> int:
    if failures:
        print(f"loraserve: {failures[0]}", file=sys.stderr)
        return 1
    return 0


def _exit(failures: list[str]) -> None:
    raise SystemExit(_exit_code(failures))


def _add_settings_flags(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    for name, field in Settings.model_fields.items():
        if names is not None and name not in names:
            continue
        flag = _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
        kind = _base_type(field.annotation)
        help_text = f"env LORASERVE_{name.upper()}"
        if kind is bool:
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text
            )
        elif kind is list:
            parser.add_argument(flag, dest=name, action="append", default=argparse.SUPPRESS, help=help_text)
        elif kind is typing.Literal:  # argparse names the flag and the allowed values on a bad one
            parser.add_argument(
                flag, dest=name, choices=typing.get_args(field.annotation), default=argparse.SUPPRESS, help=help_text
            )
        else:
            parser.add_argument(flag, dest=name, type=str, default=argparse.SUPPRESS, help=help_text)


def _base_type(annotation) -> type:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return typing.get_origin(annotation) or annotation


if __name__ == "__main__":
    sys.exit(main())
