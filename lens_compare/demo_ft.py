"""``python -m lens_compare.demo_ft [NAME]``: build the demo fine-tune on first use and report it.

    python -m lens_compare.demo_ft                     # smollm2-ft: where it is, how it trained
    python -m lens_compare.demo_ft --replies 6 --plot loss.png

The fine-tune itself lives in ``lens_compare.demo.fine_tune``; this is its command.
"""

from pathlib import Path

from lens_compare.cli import Parser, parse_or_exit, run_command, setup_logging
from lens_compare.demo.fine_tune import demo_checkpoint, format_report, load_report
from lens_compare.models.demo_recipes import RECIPES


def _report(args) -> int:
    directory = demo_checkpoint(RECIPES[args.name])
    report = load_report(directory)
    print(directory)
    print(format_report(report))
    pairs = list(zip(report["before"]["replies"], report["after"]["replies"], strict=True))
    for before, after in pairs[:: max(1, len(pairs) // args.replies)][: args.replies] if args.replies > 0 else []:
        print(f"  {before['question']!r} ({before['answer']}): {before['reply']!r} -> {after['reply']!r}")
    if args.plot:
        from lens_compare.plots import save_figure, training_curve

        print(save_figure(training_curve(report), Path(args.plot)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m lens_compare.demo_ft", description=__doc__.split("\n")[0])
    parser.add_argument("name", nargs="?", default="smollm2-ft", choices=sorted(RECIPES),
                        help="which demo checkpoint (default: smollm2-ft)")
    parser.add_argument("--plot", metavar="PNG", help="also draw the loss curve into this PNG file")
    parser.add_argument("--replies", type=int, default=0, metavar="N",
                        help="also print N held-out replies (spread over the task families), before and after")
    args = parse_or_exit(parser, argv)
    if isinstance(args, int):
        return args
    setup_logging(quiet=False)
    return run_command("lens_compare.demo_ft", lambda: _report(args))


if __name__ == "__main__":
    from lens_compare.cli import exit_with

    exit_with(main)
