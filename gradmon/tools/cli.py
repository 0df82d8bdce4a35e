"""The `gradmon` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from gradmon.errors import GradmonError

if TYPE_CHECKING:
    # What add_subparsers() returns: where each command adds its parser.
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


def _demo(args: argparse.Namespace) -> int:
    from gradmon.tools import demo

    result = demo.run_demo(  # prints its own summary at the end
        scenario=args.scenario,
        steps=args.steps,
        port=args.port,
        config=args.config,
        live=not args.no_live,
        step_delay=args.step_delay,
        with_prometheus=args.with_prometheus,
        hold=args.hold,
        alert_wait=args.alert_wait,
    )
    return 0 if result.steps else 1


def _config_check(args: argparse.Namespace) -> int:
    from gradmon.config import dump_config, load_config

    config = load_config(args.file)
    print(f"# effective gradmon config ({args.file} + GRADMON_* environment)")
    print(dump_config(config), end="")
    return 0


def _rules(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gradmon.config import load_config
    from gradmon.ops.rules import render

    text = render(load_config(args.config), args.format)
    if args.output is None:
        sys.stdout.write(text)
    else:
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as exc:
            reason = exc.strerror or exc
            raise GradmonError(f"cannot write --output {args.output}: {reason}") from exc
    return 0


def _bench(args: argparse.Namespace) -> int:
    from gradmon.tools import bench

    if args.peers:
        from gradmon.tools import bench_peers

        print(bench_peers.format_peers(bench_peers.run_peers(steps=args.steps)))
        return 0
    bench.main(steps=args.steps, as_json=args.json)
    return 0


def _dashboards_generate(args: argparse.Namespace) -> int:
    from gradmon.ops.dashboards import write

    for path in write(args.output_dir):
        print(f"wrote {path}")
    return 0


def _dashboards_push(args: argparse.Namespace) -> int:
    import json

    from gradmon.ops.grafana_push import push_dashboards, resolve_auth

    # Credentials and URL first: a bad flag fails before the dashboards are built.
    auth = resolve_auth(args.url, token=args.token, basic_auth=args.basic_auth)
    from gradmon.ops.dashboards import build, render

    dashboards = {uid: json.loads(render(d)) for uid, d in build().items()}
    for result in push_dashboards(args.url, auth=auth, dashboards=dashboards, folder=args.folder):
        print(f"pushed {result.uid} (version {result.version}): {result.url}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gradmon import viz

    out = args.output or str(Path(args.record).with_suffix(".png"))
    try:
        path = viz.plot_record(args.record, out)
    except ImportError as exc:
        raise GradmonError(str(exc)) from None
    print(f"wrote {path}")
    return 0


def _int_list(text: str) -> list[int]:
    """`3`, `0,2,5` or `0-7` (inclusive) -> a list of ints."""
    units: list[int] = []
    try:
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            units.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected e.g. 3, 0,2,5 or 0-7") from None
    if not units:
        raise argparse.ArgumentTypeError(f"{text!r}: no units")
    return units


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected sizes like 1,3,32,32") from None
    return shape


def _viz_maximize(args: argparse.Namespace) -> int:
    import torch

    from gradmon import viz

    try:
        # A full pickled nn.Module: unpickling runs code from the file (weights_only=False).
        model = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ModuleNotFoundError, AttributeError) as exc:
        raise GradmonError(f"cannot load --checkpoint {args.checkpoint}: {exc}") from None
    if not isinstance(model, torch.nn.Module):
        raise GradmonError(
            f"--checkpoint {args.checkpoint} holds a {type(model).__name__}, not a pickled "
            "nn.Module (save one with torch.save(model, path); a state_dict is not enough)"
        )
    inputs, titles = [], []
    for unit in args.unit:
        x = viz.maximize_activation(
            model,
            args.module,
            unit,
            args.shape,
            steps=args.steps,
            lr=args.lr,
            l2=args.l2,
            tv=args.tv,
            jitter=args.jitter,
            seed=args.seed,
        )
        inputs.append(x)
        titles.append(f"{args.module} unit {unit}")
    try:
        path = viz.plot_inputs(inputs, args.output, titles)
    except ImportError as exc:
        raise GradmonError(str(exc)) from None
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from gradmon.version import __version__

    parser = argparse.ArgumentParser(
        prog="gradmon", description="Gradient-health monitoring for PyTorch training."
    )
    parser.add_argument("--version", action="version", version=f"gradmon {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_demo(sub)
    _add_config(sub)
    _add_rules(sub)
    _add_bench(sub)
    _add_dashboards(sub)
    _add_plot(sub)
    _add_viz(sub)
    return parser


def _add_demo(sub: Subparsers) -> None:
    from gradmon.tools.demo import SCENARIOS

    demo = sub.add_parser("demo", help="a real training run with the agent attached")
    demo.add_argument("--scenario", choices=SCENARIOS, default="healthy")
    demo.add_argument("--steps", type=int, default=None, help="training steps (default: ~1 min)")
    demo.add_argument("--port", type=int, default=9400, help="metrics port (0 = ephemeral)")
    demo.add_argument("--config", default=None, help="a gradmon YAML config file")
    demo.add_argument("--no-live", action="store_true", help="plain log lines, no live view")
    demo.add_argument(
        "--with-prometheus",
        action="store_true",
        help="run a local Prometheus + Alertmanager (127.0.0.1) beside the run: 1 s scrapes, "
        "the production alert rules with every `for` and window 60x shorter (printed), "
        "alerts delivered to a webhook that prints them",
    )
    demo.add_argument(
        "--step-delay",
        type=float,
        default=None,
        metavar="SECONDS",
        help="each step lasts at least this long (default: no pacing; with "
        "--with-prometheus the run is spread over about 45 s)",
    )
    demo.add_argument(
        "--alert-wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="with --with-prometheus: after the last step, wait up to this long for "
        "Alertmanager to deliver the scenario's alert",
    )
    demo.add_argument(
        "--hold",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="keep /metrics (and the local stack) up this long after the last step",
    )
    demo.set_defaults(func=_demo)


def _add_config(sub: Subparsers) -> None:
    config = sub.add_parser("config", help="configuration tools")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    check = config_sub.add_parser("check", help="print the effective config or the errors")
    check.add_argument("file", help="a gradmon YAML config file")
    check.set_defaults(func=_config_check)


def _add_rules(sub: Subparsers) -> None:
    from gradmon.ops.rules import FORMATS

    rules = sub.add_parser("rules", help="Prometheus alert rules rendered from a config")
    rules.add_argument("--config", default=None, help="a gradmon YAML config file")
    rules.add_argument(
        "--format",
        choices=FORMATS,
        default="prometheus",
        help="a Prometheus rules file, or a Kubernetes PrometheusRule",
    )
    rules.add_argument("--output", default=None, help="write here (default: stdout)")
    rules.set_defaults(func=_rules)


def _add_bench(sub: Subparsers) -> None:
    bench = sub.add_parser("bench", help="agent overhead on the reference model (CPU)")
    bench.add_argument("--steps", type=int, default=30, help="interleaved steps per variant")
    bench.add_argument("--json", action="store_true", help="print the result as JSON")
    bench.add_argument(
        "--peers",
        action="store_true",
        help="step-time ratios of gradmon and today's gradient loggers, side by side",
    )
    bench.set_defaults(func=_bench)


def _add_dashboards(sub: Subparsers) -> None:
    dashboards = sub.add_parser("dashboards", help="Grafana dashboards: generate the JSON, push")
    dash_sub = dashboards.add_subparsers(dest="dashboards_command", required=True, metavar="ACTION")
    generate = dash_sub.add_parser("generate", help="write the dashboard JSON files")
    generate.add_argument(
        "--output-dir", default="dashboards", help="write here (default: dashboards)"
    )
    generate.set_defaults(func=_dashboards_generate)
    push = dash_sub.add_parser(
        "push", help="save the dashboards in a running Grafana (same uids, overwritten)"
    )
    push.add_argument("--url", required=True, help="Grafana's URL, e.g. http://localhost:3000")
    auth = push.add_mutually_exclusive_group()
    auth.add_argument(
        "--token", default=None, help="a service account token (default: $GRAFANA_TOKEN)"
    )
    auth.add_argument("--basic-auth", default=None, metavar="USER:PASS", help="basic auth")
    push.add_argument(
        "--folder", default=None, help="folder title, created if missing (default: General)"
    )
    push.set_defaults(func=_dashboards_push)


def _add_plot(sub: Subparsers) -> None:
    plot = sub.add_parser(
        "plot", help="a PNG report of a record file (record.path): norms, layer heatmap, anomalies"
    )
    plot.add_argument("record", help="a gradmon record file (JSONL)")
    plot.add_argument(
        "-o", "--output", default=None, help="the PNG to write (default: RECORD with .png)"
    )
    plot.set_defaults(func=_plot)


def _add_viz(sub: Subparsers) -> None:
    viz = sub.add_parser("viz", help="visual tools for a model (needs gradmon[viz])")
    viz_sub = viz.add_subparsers(dest="viz_command", required=True, metavar="ACTION")
    maximize = viz_sub.add_parser(
        "maximize",
        help="activation maximization: the input each unit of a module responds to most",
        description="Optimizes an input per unit by gradient ascent and saves them as an image "
        "grid. --checkpoint must be a full model saved with torch.save(model, path); it is "
        "loaded with torch.load(weights_only=False), which runs code from the file: only use "
        "checkpoints you trust.",
    )
    maximize.add_argument("--module", required=True, help="module name, as in named_modules()")
    maximize.add_argument(
        "--unit", required=True, type=_int_list, help="channel(s) of dim 1: 3, 0,2,5 or 0-7"
    )
    maximize.add_argument("--shape", required=True, type=_shape, help="input shape, e.g. 1,3,32,32")
    maximize.add_argument(
        "--checkpoint",
        required=True,
        help="a full pickled model (torch.save(model, path)); loaded with "
        "torch.load(weights_only=False): trusted files only",
    )
    maximize.add_argument("-o", "--output", default="maximize.png", help="the PNG to write")
    maximize.add_argument("--steps", type=int, default=200, help="ascent steps per unit")
    maximize.add_argument("--lr", type=float, default=0.05, help="Adam learning rate")
    maximize.add_argument("--l2", type=float, default=1e-3, help="weight of mean(x^2)")
    maximize.add_argument("--tv", type=float, default=1e-2, help="weight of total variation")
    maximize.add_argument("--jitter", type=int, default=2, help="random shift, pixels")
    maximize.add_argument("--seed", type=int, default=0)
    maximize.set_defaults(func=_viz_maximize)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except GradmonError as exc:
        print(f"gradmon: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
