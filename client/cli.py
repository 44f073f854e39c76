"""`loraserve complete | chat | adapters ...`: command-line use of the client."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .client import DEFAULT_URL, Client
from .errors import LoraserveError
from .plots import plot_analysis, plot_similarity
from .types import AdapterAnalysis


def add_client_commands(commands: argparse._SubParsersAction) -> argparse._SubParsersAction:
    """Add the client's commands; returns the `adapters` group, where `serve`'s CLI adds offline ones."""
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
    upload.add_argument("--energy", type=float, help="compress: keep this fraction of each layer's update")
    upload.add_argument("--max-rank", type=int, help="compress: at most this rank per layer")
    upload.set_defaults(run=lambda c, a: _print(c.upload_adapter(a.name, a.path, a.replace, a.energy, a.max_rank)))
    adapters.add_parser("list", parents=[common]).set_defaults(run=lambda c, a: _print(c.adapters()))
    show = adapters.add_parser("show", parents=[common])
    show.add_argument("name")
    show.set_defaults(run=lambda c, a: _print(c.adapter(a.name)))
    compose = adapters.add_parser("compose", parents=[common], help="name a composition: NAME A=0.5 B=1.0")
    compose.add_argument("name")
    compose.add_argument("terms", nargs="+", metavar="ADAPTER=SCALE")
    compose.add_argument("--replace", action="store_true")
    compose.set_defaults(run=lambda c, a: _print(c.compose(a.name, _terms(a.terms), a.replace)))
    remove = adapters.add_parser("rm", parents=[common], help="delete an adapter")
    remove.add_argument("name")
    remove.set_defaults(run=lambda c, a: c.delete_adapter(a.name) or print(f"deleted {a.name}"))
    inspect = adapters.add_parser("inspect", parents=[common], help="per-layer analysis of an adapter's update")
    inspect.add_argument("name")
    inspect.add_argument("--plot", metavar="FILE.png", help="also draw it (needs loraserve[plot])")
    inspect.set_defaults(run=_inspect)
    compare = adapters.add_parser("compare", parents=[common], help="subspace similarity of two adapters")
    compare.add_argument("name")
    compare.add_argument("other")
    compare.add_argument("--plot", metavar="FILE.png", help="also draw it (needs loraserve[plot])")
    compare.set_defaults(run=_compare)
    return adapters


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


def _inspect(client: Client, args) -> None:
    analysis = client.analysis(args.name)
    print(format_analysis(analysis))
    if args.plot:
        plot_analysis(analysis, args.plot)
        print(f"figure: {args.plot}")


def _compare(client: Client, args) -> None:
    result = client.similarity(args.name, args.other)
    print(f"{'module':<40} {'similarity':>10}")
    for layer in result.layers:
        print(f"{layer['module']:<40} {layer['similarity']:>10.4f}")
    print(f"{'mean':<40} {result.mean if result.mean is not None else float('nan'):>10.4f}")
    if args.plot:
        plot_similarity(result, args.plot)
        print(f"figure: {args.plot}")


def format_analysis(analysis: AdapterAnalysis) -> str:
    """One line per layer: rank, scale, ‖ΔW‖, effective ranks, amplification; then the summary."""
    energies = list(analysis.summary["effective_rank"])
    header = f"{'module':<40} {'rank':>4} {'scale':>7} {'|dW|':>9} " + " ".join(f"{'r@' + e:>7}" for e in energies)
    lines = [header + f" {'amplif.':>8}"]
    for layer in analysis.layers:
        amp = layer["amplification"]
        lines.append(
            f"{layer['module']:<40} {layer['rank']:>4} {layer['scale']:>7.3g} {layer['delta_norm']:>9.4g} "
            + " ".join(f"{layer['effective_rank'][e]:>7}" for e in energies)
            + f" {amp if amp is not None else float('inf'):>8.3g}"
        )
    summary = analysis.summary
    lines.append(
        f"{summary['num_layers']} layers, rank {summary['rank']}, {summary['num_params']} parameters, "
        f"|dW| {summary['delta_norm']:.4g}, effective rank "
        + ", ".join(f"{summary['effective_rank'][e]} @ {e}" for e in energies)
    )
    lines.extend(f"warning: {warning}" for warning in summary["warnings"])
    return "\n".join(lines)


def _terms(pairs: list[str]) -> dict[str, float]:
    """ADAPTER=SCALE arguments; a bare ADAPTER means scale 1."""
    terms = {}
    for pair in pairs:
        name, sep, scale = pair.partition("=")
        try:
            terms[name] = float(scale) if sep else 1.0
        except ValueError:
            raise SystemExit(f"loraserve: {pair!r}: expected ADAPTER=SCALE with a number") from None
    return terms


def _print_stream(deltas) -> None:
    for delta in deltas:
        print(delta.text, end="", flush=True)
    print()


def _print(value) -> None:
    items = value if isinstance(value, list) else [value]
    print(
        json.dumps([item.model_dump() for item in items] if isinstance(value, list) else value.model_dump(), indent=2)
    )
