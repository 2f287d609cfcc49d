"""The ``mupderive`` command line: declare -> derive -> generate -> verify.

Each subcommand's work lives in its own module and is imported only when that subcommand runs, so ``--help`` and
the symbolic commands start without torch.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Sequence

from mupderive.errors import MupError

EPILOG = """\
RULE is a built-in name (see `mupderive list`) or a path to a rule file (.toml); see the README's rule-file
reference. Exponents are powers of the width n: -1/2 means "scales as 1/sqrt(n)"; with --depth, also of the depth
ratio L/L_base (residual blocks).

examples:
  mupderive list
  mupderive derive adamw                       # per-layer exponents (TP-V Table 3 convention)
  mupderive derive adamw --convention mup-package --format json
  mupderive explain lamb --layer hidden        # the derivation step by step
  mupderive derive adamw --depth               # width and depth exponents (CompleteP: alpha = 1)
  mupderive derive sgd --branch-matrices 1     # Depth-muP (alpha = 1/2) for one-matrix branches
  mupderive compare adam table8.json           # is a published table the same parameterization?
  mupderive analyze adam --parameterization sp --alignment none   # largest stable lrs in SP (Everett et al.)
  mupderive generate muon -o mup_muon.py       # a self-contained PyTorch module
  mupderive oracle sophia                      # measure the real optimizer at several widths
  mupderive oracle adamw --depths 2,4,8,16,32  # ... on residual stacks at several depths
  mupderive coord-check adam --model gpt       # coordinate check on a real model
  mupderive coord-check adam --model gpt --parameterization sp --alignment full   # SP with per-layer lrs
  mupderive coord-check adamw --model gpt --depths 2,4,8,16 --widths 64   # ... across depth
  mupderive transfer adamw --store sweep.db    # learning-rate transfer sweep
  mupderive transfer adamw --depths 2,4,8,16 --widths 64   # ... across depth
"""


def _rule_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("rule", metavar="RULE", help="built-in rule name or path to a rule file")


def _convention_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--convention", default="spectral", choices=["spectral", "mup-package"],
                   help="spectral: all multipliers 1 (TP-V Table 3); mup-package: readout multiplier "
                        "1/width_mult as the mup package does (default: spectral)")
    p.add_argument("--fix", action="append", default=[], metavar="ROLE.KNOB=EXP",
                   help="fix a knob's width exponent and solve the rest, e.g. --fix output.multiplier=-1; "
                        "ROLE in input|hidden|output|vector, KNOB in multiplier|init_std|lr (repeatable)")
    p.add_argument("--set", action="append", default=[], metavar="FLAG=true|false",
                   help="choose a boolean option of the rule, e.g. --set nesterov=true (repeatable)")


def _depth_args(p: argparse.ArgumentParser, flag: bool = True) -> None:
    if flag:
        p.add_argument("--depth", action="store_true",
                       help="also derive the exponents of the depth ratio L/L_base (residual branches times "
                            "L^-alpha); implied by --branch-matrices and --alpha")
    p.add_argument("--branch-matrices", type=int, default=None, metavar="K",
                   help="matrices stacked in one residual branch (default 2: alpha = 1, CompleteP; 1: alpha = 1/2, "
                        "Depth-muP)")
    p.add_argument("--alpha", default=None, metavar="A",
                   help="impose the branch multiplier L^-A (a rational such as 1/2); the output says what breaks")


def _depth_sweep_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--depths", default=None, metavar="D1,D2,...", help=f"comma-separated depths: {what}")
    p.add_argument("--no-depth-scaling", action="store_true",
                   help="with --depths: apply the generated module width-only (no branch multiplier, no depth "
                        "factor; the model as its own depth base), the baseline the depth scaling is tested against")


def _parameterization_args(p: argparse.ArgumentParser, standard: bool = False) -> None:
    plain = "standard (the model's own init, the real optimizer, one lr for all), " if standard else ""
    p.add_argument("--parameterization", default="derived",
                   metavar=f"derived|{'standard|' if standard else ''}sp|ntk|mup|mfp|TABLE.json",
                   help=f"derived (the spectral condition's muP, default), {plain}or keep Everett et al.'s SP, NTK, "
                        "muP or MFP multipliers and init (or a JSON table, as for analyze) and take each role's "
                        "largest stable lr and hyperparameters from `mupderive analyze`")
    p.add_argument("--alignment", default=None, metavar="full|none|TABLE.json",
                   help="with an analysed --parameterization: the alignment assumption of the analysis, full, none "
                        "or a JSON table (what coord-check --measure-alignment writes) (default: full)")


def _verify_args(p: argparse.ArgumentParser, widths: str) -> None:
    p.add_argument("--widths", default=widths, help=f"comma-separated widths (default: {widths})")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to run: auto picks CUDA when available (default: auto)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mupderive", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Derive muP width-scaling rules for any optimizer from its declared update rule, generate "
                    "PyTorch modules that apply them, and verify them by measurement.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("list", help="list the built-in rules", formatter_class=fmt,
                       description="List the built-in rules: name, title, paper and the implementation mirrored.")
    p.add_argument("--format", default="table", choices=["table", "json"])

    p = sub.add_parser("show", help="print a parsed rule", formatter_class=fmt,
                       description="Parse and check a rule file and pretty-print it (hyperparameters with roles, "
                                   "state, the update program, the mirrored implementation).")
    _rule_arg(p)

    p = sub.add_parser("derive", help="derive the width exponents of a rule", formatter_class=fmt,
                       description="Width exponents per layer role (input, hidden, output, vector): multiplier, "
                                   "init std, learning rate and every scale-carrying hyperparameter, with what "
                                   "breaks if a hyperparameter is kept fixed, and general formulas in "
                                   "fan_in/fan_out.")
    _rule_arg(p)
    _convention_args(p)
    p.add_argument("--layer", action="append", default=[], metavar="NAME=O,I",
                   help="also derive a matrix whose fan_out ~ n^O and fan_in ~ n^I, e.g. --layer ffn=1/2,1 "
                        "(repeatable)")
    _depth_args(p)
    p.add_argument("--format", default="table", choices=["table", "json", "markdown", "latex"],
                   help="table (terminal), json (the mupderive.derivation/1 contract), markdown, latex")

    p = sub.add_parser("explain", help="explain a derivation step by step", formatter_class=fmt,
                       description="The derivation for one layer as a researcher would write it: the layer's "
                                   "state, the scale of each quantity of the rule, each balance point and the "
                                   "exponent it fixes, the learning rate from the spectral condition, the "
                                   "symmetry degree kappa, and the diagnosis for fixed hyperparameters.")
    _rule_arg(p)
    _convention_args(p)
    p.add_argument("--layer", default=None, metavar="ROLE",
                   help="input, hidden, output or vector; tied (one tensor as embedding and readout) or "
                        "attention (the logit scale); or NAME=O,I for a matrix with fan_out ~ n^O and "
                        "fan_in ~ n^I (default: all of them)")
    _depth_args(p)
    p.add_argument("--format", default="text", choices=["text", "markdown"])

    p = sub.add_parser("compare", help="check a published table of exponents against the derivation",
                       formatter_class=fmt,
                       description="Compare a table of width exponents (JSON shaped like `derive --format json`: "
                                   "{\"layers\": {ROLE: {\"multiplier\": \"-1\", \"init_std\": \"0\", "
                                   "\"lr\": \"0\", ...}}}) with the derivation in the table's own multiplier "
                                   "convention, i.e. modulo the abc-symmetry. Exit 0 when it is the same "
                                   "parameterization, 1 when an exponent differs (each is named, with what it does).")
    _rule_arg(p)
    p.add_argument("table", metavar="TABLE.json", help="the exponents to check")
    p.add_argument("--format", default="table", choices=["table", "json"])

    p = sub.add_parser("analyze", help="largest stable lrs under any parameterization and alignment",
                       formatter_class=fmt,
                       description="Everett et al.'s analysis for any rule: per role, the exponent E of the largest "
                                   "stable learning rate (lr ~ n^E), the layer's output change there (0: it learns "
                                   "features; below: lazy), the change with one lr for every layer, every "
                                   "scale-carrying hyperparameter balanced at that parameterization's gradient (a "
                                   "fixed eps underflows where its exponent is negative), and whether the "
                                   "parameterization is muP moved along the abc-symmetry. The update direction "
                                   "comes from the rule's calculus; the alignment sets how coherently each of a "
                                   "layer's three output-change terms sums over its fan_in.")
    _rule_arg(p)
    p.add_argument("--parameterization", default="sp", metavar="sp|ntk|mup|mfp|TABLE.json",
                   help="Everett et al.'s SP, NTK, muP or MFP, or a JSON file {ROLE: {\"multiplier\": E, "
                        "\"init_std\": E}} for input, hidden, output (vector optional) (default: sp)")
    p.add_argument("--alignment", default="full", metavar="full|none|TABLE.json",
                   help="full (coherent updates), none (incoherent), or a JSON file {ROLE: {\"own\": k, "
                        "\"propagated\": k, \"cross\": k}} with k in [1/2, 1], or the table coord-check "
                        "--measure-alignment writes (default: full)")
    p.add_argument("--format", default="table", choices=["table", "json", "markdown", "latex"])

    p = sub.add_parser("generate", help="emit a self-contained PyTorch module", formatter_class=fmt,
                       description="Render the templates into one Python module that applies the derived rules "
                                   "to any model (given a smaller base model) and builds the real optimizer with "
                                   "per-layer settings. It imports torch and the mirrored library, never "
                                   "mupderive.")
    _rule_arg(p)
    _convention_args(p)
    _parameterization_args(p)
    p.add_argument("--branch-matrices", type=int, default=None, metavar="K",
                   help="matrices stacked in one residual branch, for the depth tables (default 2: alpha = 1, "
                        "CompleteP; 1: alpha = 1/2, Depth-muP)")
    p.add_argument("--alpha", default=None, metavar="A",
                   help="impose the branch multiplier L^-A (a rational such as 1/2); the module says what breaks")
    p.add_argument("-o", "--output", required=True, metavar="FILE.py", help="where to write the module")

    p = sub.add_parser("oracle", help="measure the real optimizer against the derivation", formatter_class=fmt,
                       description="Run the real implementation the rule mirrors on synthetic layer states at "
                                   "several widths, fit log-log slopes of |dW|_*, |dW|_F, rms(dW), |dW x|/|x| and "
                                   "every compared term, and compare with the symbolic prediction (also for each "
                                   "hyperparameter kept fixed). A prediction marked +log is n^e log n: its slope may "
                                   "exceed e by up to 1/ln(smallest width). Exit 0 when every check passes, 1 "
                                   "otherwise.")
    _rule_arg(p)
    _verify_args(p, "64,128,256,512,1024")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per width (default: 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tolerance", type=float, default=0.1, help="allowed |slope - prediction| (default: 0.1)")
    p.add_argument("--format", default="table", choices=["table", "json"])
    p.add_argument("--out", default=None, metavar="DIR", help="write JSON and a log-log plot (PNG) here")
    p.add_argument("--depths", default=None, metavar="L1,L2,...",
                   help="instead of widths, train residual stacks of these depths (e.g. 2,4,8,16,32) at width 64 "
                        "with the derived depth factors and fit the per-branch change (~ L^-1), the joint change of "
                        "two matrices and the stream's change (~ L^0); also run width-only and the other alpha")
    p.add_argument("--seeds", type=int, default=2, help="stacks per depth with --depths (default: 2)")
    _depth_args(p, flag=False)

    p = sub.add_parser("coord-check", help="coordinate check on a real model", formatter_class=fmt,
                       description="Train a few steps at increasing widths with the generated module and check "
                                   "that every layer's activations and their changes keep their scale (fitted "
                                   "slope near the prediction); attention logits are recorded as layers "
                                   "attention_logits.K. Exit 0 only if every layer passes, 1 when one fails (named, "
                                   "with its slope and likely cause), 2 for bad input.")
    _rule_arg(p)
    _verify_args(p, "64,128,256,512")
    p.add_argument("--model", default="mlp", metavar="mlp|gpt|FILE.py:FUNC[:TASK]",
                   help="the built-in MLP or GPT, or a model of your own: FUNC(width) in FILE.py returns the "
                        "nn.Module at that width; trained as a causal LM on the character corpus (token ids in, "
                        "logits or .logits out, e.g. any Hugging Face *ForCausalLM) unless the file (or its object "
                        "TASK) defines batches(batch_size, generator) and optionally loss(model, x, y) "
                        "(default: mlp)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--seeds", type=int, default=3)
    _parameterization_args(p, standard=True)
    _convention_args(p)
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate at the base (smallest) width (default: a per-rule value, see the docs)")
    p.add_argument("--tolerance", type=float, default=0.15,
                   help="a layer passes when |slope| <= tolerance + its 95%% CI (default: 0.15)")
    p.add_argument("--measure-alignment", default=None, metavar="FILE.json",
                   help="also fit Everett et al.'s alignment exponents of every weight matrix (its output change "
                        "terms dW z0, W0 dz, dW dz against coherent n^1 and incoherent n^1/2 sums over fan_in) and "
                        "write the table `analyze --alignment FILE.json` reads")
    _depth_sweep_args(p, "check the depth instead: train at the smallest of --widths with D residual blocks each "
                         "(gpt, or FUNC(width, depth) of your own), slopes against depth; the residual stream after "
                         "matched blocks is judged too")
    p.add_argument("--out", default=None, metavar="DIR", help="write JSON and PNG plots here")

    p = sub.add_parser("transfer", help="learning-rate transfer sweep", formatter_class=fmt,
                       description="Train across widths and learning rates with the generated module, store every "
                                   "run in SQLite as it finishes (resumable), and report the best learning rate "
                                   "per width and its drift across widths.")
    _rule_arg(p)
    _verify_args(p, "64,128,256,512")
    p.set_defaults(widths=None)  # unset options take the full or the --quick preset
    p.add_argument("--model", default=None, metavar="mlp|gpt|FILE.py:FUNC[:TASK]",
                   help="the built-in MLP or GPT, or FUNC(width) in FILE.py returning your nn.Module (a causal LM "
                        "on the character corpus unless the file defines batches/loss, as for coord-check) "
                        "(default: gpt; mlp with --quick)")
    p.add_argument("--lrs", default=None, help="comma-separated learning rates (default: the rule's default lr "
                                               "times 2^-4 .. 2^4; 2^-2 .. 2^2 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="default: 200 (20 with --quick)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 16 sequences for gpt, 64 for mlp "
                                                                "(8 and 32 with --quick)")
    p.add_argument("--seeds", type=int, default=1)
    _parameterization_args(p, standard=True)
    p.add_argument("--quick", action="store_true",
                   help="a small sweep for smoke tests: depth-3 mlp, widths 32,64,128, 5 lrs, 20 steps")
    _depth_sweep_args(p, "sweep the depth instead: train at one width (the first of --widths, default 64) with D "
                         "residual blocks each (gpt, or FUNC(width, depth) of your own); the drift is across depths")
    p.add_argument("--store", default="mupderive-transfer.db", metavar="FILE",
                   help="SQLite results store: finished runs are skipped, so an interrupted sweep resumes")
    p.add_argument("--executor", default="local", choices=["local", "ray"],
                   help="where runs train: one after another here (local), or one Ray task each (ray; needs "
                        "pip install 'mupderive[ray]'); either way only this process writes the store")
    p.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="with --executor ray: join this cluster (auto, HOST:6379, ray://HOST:10001) instead of "
                        "starting a local Ray instance sized to this machine")
    p.add_argument("--format", default="table", choices=["table", "json"], help="what to print")
    p.add_argument("--out", default=None, metavar="DIR", help="write the plot (PNG) and the JSON report here")
    return parser


COMMANDS = {
    "list": "mupderive.commands:list_rules",
    "show": "mupderive.commands:show",
    "derive": "mupderive.commands:derive",
    "explain": "mupderive.commands:explain",
    "compare": "mupderive.commands:compare_table",
    "analyze": "mupderive.commands:analyze",
    "generate": "mupderive.codegen.generate:command",
    "oracle": "mupderive.verify.oracle:command",
    "coord-check": "mupderive.verify.coord.command:command",
    "transfer": "mupderive.verify.transfer:command",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one subcommand; user errors print one line and exit 2."""
    args = build_parser().parse_args(argv)
    module, func = COMMANDS[args.command].split(":")
    try:
        return getattr(importlib.import_module(module), func)(args) or 0
    except MupError as exc:
        message = str(exc).replace("\n", " ")
        located = re.match(r"^\S+:\d+:\d+: ", message)
        print(message if located else f"mupderive: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mupderive: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
