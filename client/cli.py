"""`loraserve complete | chat | adapters ...`: command-line use of the client."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .client import DEFAULT_URL, Client
from .errors import LoraserveError


def add_client_commands(commands: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=os.environ.get("LORASERVE_URL", DEFAULT_URL), help="server URL")
    common.add_argument("--api-key", default=os.environ.get("LORASERVE_API_KEY"), help="bearer key")

    generate = argparse.ArgumentParser(add_help=False, parents=[common])
    generate.add_argument("--model", required=True, help="the base model's name or an adapter's")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--no-stream", action="store_true", help="wait for the whole answer")

    complete = commands.add_parser("complete", parents=[generate], help="complete a prompt")
    complete.add_argument("prompt")
    complete.set_defaults(run=_generate)
    chat = commands.add_parser("chat", parents=[generate], help="one chat turn")
    chat.add_argument("message")
    chat.set_defaults(run=_generate)

    adapters = commands.add_parser("adapters", help="manage adapters").add_subparsers(dest="action", required=True)
    upload = adapters.add_parser("upload", parents=[common], help="upload a PEFT adapter directory")
    upload.add_argument("name")
    upload.add_argument("path")
    upload.add_argument("--replace", action="store_true")
    upload.set_defaults(run=lambda c, a: _print(c.upload_adapter(a.name, a.path, a.replace)))
    adapters.add_parser("list", parents=[common]).set_defaults(run=lambda c, a: _print(c.adapters()))
    show = adapters.add_parser("show", parents=[common])
    show.add_argument("name")
    show.set_defaults(run=lambda c, a: _print(c.adapter(a.name)))
    remove = adapters.add_parser("rm", parents=[common], help="delete an adapter")
    remove.add_argument("name")
    remove.set_defaults(run=lambda c, a: c.delete_adapter(a.name) or print(f"deleted {a.name}"))


def run_client_command(args: argparse.Namespace) -> int:
    try:
        with Client(args.url, api_key=args.api_key) as client:
            args.run(client, args)
    except LoraserveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _generate(client: Client, args) -> None:
    """`complete` sends a raw prompt, `chat` one user message through the chat template."""
    params = {"max_tokens": args.max_tokens, "temperature": args.temperature}
    text = args.prompt if args.command == "complete" else args.message
    if args.no_stream:
        call = client.complete if args.command == "complete" else client.chat
        print(call(args.model, text, **params).text)
    else:
        stream = client.stream_complete if args.command == "complete" else client.stream_chat
        _print_stream(stream(args.model, text, **params))


def _print_stream(deltas) -> None:
    for delta in deltas:
        print(delta.text, end="", flush=True)
    print()


def _print(value) -> None:
    items = value if isinstance(value, list) else [value]
    print(json.dumps([item.model_dump() for item in items] if isinstance(value, list) else value.model_dump(),
                     indent=2))
