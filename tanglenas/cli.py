"""The `tanglenas` command: search, evaluate, rank and plot.

  tanglenas search --config experiments/toy_cell_darts_we.py --smoke  # a one-minute search on a CPU
  tanglenas search --config experiments/toy_cell_darts_ws.py --seed 1 --epochs 10
  tanglenas evaluate runs/toy_cell_darts_we-seed0 --epochs 20         # retrain the derived architecture
  tanglenas rank runs/toy_cell_darts_we-seed0 --benchmark toy.pkl      # supernet ranking vs the table
  tanglenas plot runs/toy_cell_darts_we-seed0                         # PNGs into <run_dir>/plots

`tanglenas search --config FILE --help` lists every option with the experiment's default.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import difflib
import io
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import tyro

from tanglenas import commands
from tanglenas.config import Config, Scalar, load_experiment
from tanglenas.errors import DivergenceError, RunError


@dataclasses.dataclass(frozen=True)
class SearchCommand:
  """Search an architecture with an experiment's configuration; any option below overrides it."""

  config: str  # experiment file defining get_config(smoke: bool = False) -> Config
  smoke: bool = False  # the experiment's tiny preset (a minute on a CPU); replaces a smoke run in its default workdir
  workdir: str = ""  # run directory; empty: runs/<experiment>[-smoke]-seed<seed>
  resume: bool = False  # continue the run in the run directory from its last checkpoint
  overwrite: bool = False  # start over, replacing the run in the run directory
  space_option: tuple[str, ...] = ()  # space options as KEY=VALUE, also those the experiment file does not set
  run: Annotated[Config, tyro.conf.OmitArgPrefixes] = Config()


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="tanglenas", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  subparsers = parser.add_subparsers(dest="command", required=True)
  search = subparsers.add_parser("search", add_help=False, help="search an architecture (--config FILE --help)")
  search.add_argument("--config", default="")
  search.add_argument("--smoke", action=argparse.BooleanOptionalAction, default=False)
  evaluate = _run_dir_command(subparsers, "evaluate", "test a run's derived architecture extracted from its "
                              "supernet and, with --epochs, retrained from scratch; accuracies go to summary.json")
  evaluate.add_argument("--epochs", type=int, help="retraining epochs (default: the run's eval_epochs, 0 in the "
                        "shipped experiments: no retraining)")
  evaluate.add_argument("--benchmark", default="", help="also look the architecture up in this tabular benchmark")
  rank = _run_dir_command(subparsers, "rank", "rank architectures by a run's supernet against a tabular "
                          "benchmark (Kendall tau; ranking.json)")
  rank.add_argument("--benchmark", required=True, help="tabular benchmark (pickle) of the run's space")
  rank.add_argument("--architectures", type=int, default=100, help="how many of its architectures to score")
  _run_dir_command(subparsers, "plot", "draw a run's metrics as PNG files in <run_dir>/plots")
  args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
  if rest and args.command != "search":
    parser.error(f"unrecognized arguments: {' '.join(rest)}")
  try:  # start-up: every mistake in the input ends here, in one line
    if args.command == "search":
      command = _parse_search(args.config, args.smoke, rest)
      replaces_smoke_run = command.smoke and not command.workdir and not command.resume
      run = commands.prepare_search(command.run, command.config, workdir=command.workdir, smoke=command.smoke,
                                    resume=command.resume, overwrite=command.overwrite or replaces_smoke_run)
    elif args.command == "evaluate":
      run = commands.prepare_evaluate(args.run_dir, epochs=args.epochs, benchmark=args.benchmark)
    elif args.command == "rank":
      run = commands.prepare_rank(args.run_dir, benchmark=args.benchmark, architectures=args.architectures)
    else:
      run = commands.prepare_plot(args.run_dir)
  except (ValueError, FileNotFoundError) as error:
    print(f"tanglenas {args.command}: error: {error}", file=sys.stderr)
    return 2
  try:
    run()
  except (DivergenceError, RunError) as error:  # the run's files and checkpoints stay
    print(f"tanglenas {args.command}: error: {error}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    resume = " (the run keeps its last checkpoint: continue it with --resume)" if args.command == "search" else ""
    print(f"tanglenas {args.command}: interrupted{resume}", file=sys.stderr)
    return 130
  return 0


def _run_dir_command(subparsers, name: str, text: str) -> argparse.ArgumentParser:
  command = subparsers.add_parser(name, help=text, description=text)
  command.add_argument("run_dir", help="the run directory of a search (holds config.json)")
  return command


def _parse_search(config_file: str, smoke: bool, args: Sequence[str]) -> SearchCommand:
  """The experiment file's Config (loaded first: it gives the defaults) overridden by the command line. With
  --resume, the configuration the run was started with gives the defaults instead, so that only the options
  given now can differ from it."""
  if not config_file and not {"-h", "--help"} & set(args):
    raise ValueError("search needs an experiment: --config experiments/<name>.py")
  experiment = load_experiment(config_file, smoke=smoke) if config_file else Config()
  command = _parse_search_with(SearchCommand(config=config_file, smoke=smoke, run=experiment), args)
  if command.resume:
    path = command.workdir or commands.default_workdir(config_file, command.run.seed, smoke=smoke)
    if (Path(path) / "config.json").is_file():
      saved = commands.load_run_config(path)
      command = _parse_search_with(SearchCommand(config=config_file, smoke=smoke, run=saved), args)
  return command


def _parse_search_with(default: SearchCommand, args: Sequence[str]) -> SearchCommand:
  captured = io.StringIO()
  try:
    with contextlib.redirect_stderr(captured):
      command = tyro.cli(SearchCommand, default=default, args=list(args), prog="tanglenas search")
  except SystemExit as exit:
    if exit.code:  # tyro drew a box around its message: keep the message
      raise ValueError(_boxed_message(captured.getvalue())) from None
    raise
  given = [_space_option(item) for item in command.space_option]
  repeated = sorted({key for key, _ in given if [k for k, _ in given].count(key) > 1})
  if repeated:
    raise ValueError(f"--space-option gives {', '.join(repeated)} more than once: give each option once")
  options = {**command.run.space_options, **dict(given)}
  return dataclasses.replace(command, run=command.run.replace(space_options=options))


def _space_option(item: str) -> tuple[str, Scalar]:
  """`KEY=VALUE` with VALUE read as a Python literal (8, 0.1, True), else kept as text."""
  key, equals, text = item.partition("=")
  if not equals or not key:
    raise ValueError(f"--space-option takes KEY=VALUE, e.g. channels=16; got {item!r}")
  try:
    return key, ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return key, text


def _boxed_message(text: str) -> str:
  """tyro's boxed error (UTF-8 box, or plain rules when stdout is not UTF-8) as one line: the message and,
  for a misspelt option, the closest suggestion."""
  lines = []  # [title, message..., "Perhaps you meant:", suggestions..., "For full helptext, run ..."]
  for line in text.splitlines():
    line = line.strip().strip("│|").strip()
    if line[:1] in ("╭", "╰", "+") or not line.strip("─-"):  # a border (the top one holds the title) or rule
      line = line.strip("╭╮╰╯+─-").strip()
    if line:
      lines.append(line)
  ends = [i for i, line in enumerate(lines) if line.startswith(("Perhaps you meant", "For full helptext"))]
  message = " ".join(" ".join(lines[1:ends[0] if ends else None]).split()) or lines[0]
  suggestions = [line.split()[0] for line in lines[ends[0]:ends[-1]] if line.startswith("--")] if ends else []
  given = re.match(r"Unrecognized options?: (--[\w-]+)", message)
  if given and suggestions:  # tyro lists every option holding the word; the closest spelling first
    suggestions.sort(key=lambda option: -difflib.SequenceMatcher(None, given.group(1), option).ratio())
  hint = f"; did you mean {suggestions[0]}?" if suggestions else ""
  return message + hint + " (see tanglenas search --config FILE --help)"
