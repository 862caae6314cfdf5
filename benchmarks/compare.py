"""Measure jaxlstm beside other frameworks' LSTM benchmarks in one run.

    python benchmarks/compare.py --peers-dir PEERS --reps 3 \\
        --torch-python TORCHVENV/bin/python --tf-python TFVENV/bin/python
    python benchmarks/compare.py --peers-dir PEERS --reps 1 --quick

PEERS is a folder of peer benchmark scripts. `peak.py` measures float32
matrix product GFLOP/s. `flax_naive.py` trains a plain Flax LSTM,
`torch_lstm.py` an eager PyTorch one and `keras_lstm.py` a Keras one on
TensorFlow. Each prints one JSON object as the last line of its standard
output, and `report.py` prints a table of such lines. The peer scripts take
`--config word` or `--config char` for the same two models that
`benchmarks/speed.py` measures, and read the repetition number from
`PEERS_REP`.

Every repetition first runs `peak.py`, then, per config, each participant in
its own process: jaxlstm (`benchmarks/speed.py`), flax_naive, torch and keras.
The participants take turns in a fixed order, reversed on every other
repetition, so that a slow drift of a shared machine hits all of them alike.
jaxlstm and flax_naive run with this Python. torch runs only with
`--torch-python`, keras only with `--tf-python`, and each only if that Python
imports its framework.

All result lines go to OUT/results.jsonl and the processes' stderr to
OUT/log.txt. At the end the peers' `report.py` prints its table of that
file, and this script prints a summary of jaxlstm against each peer: ratios
are taken inside each repetition, then the median over repetitions is shown.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

SPEED_SCRIPT = Path(__file__).resolve().with_name("speed.py")
PEER_SCRIPTS = {
    "flax_naive": "flax_naive.py",
    "torch": "torch_lstm.py",
    "keras": "keras_lstm.py",
}
REQUIRED_FILES = ("peak.py", "report.py", *PEER_SCRIPTS.values())
CONFIGS = ("word", "char")
PEAK_REPS = 5  # timed products per shape and library in peak.py
QUICK_PEAK_REPS = 3
# A process running longer than this is treated as hung and stopped, and
# its result is missing from the tables.
PROCESS_TIMEOUT_S = 1800
# Environment variables that this script sets for the peer scripts itself.
OWN_PEER_VARIABLES = {"PEERS_REP"}


class Participant(NamedTuple):
    """A benchmarked implementation and the Python that runs it."""

    name: str  # the `peer` field of its result lines
    python: str


def log(message: str) -> None:
    """Print a progress line on stderr."""
    print(message, file=sys.stderr, flush=True)


def check_import(python: str, modules: str) -> str | None:
    """Try `import modules` with `python`.

    Returns:
      None when the import works, else the last line of the error.
    """
    try:
        completed = subprocess.run(
            [python, "-c", f"import {modules}"],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return str(error)
    if completed.returncode == 0:
        return None
    lines = completed.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {completed.returncode}"


def find_participants(args: argparse.Namespace) -> list[Participant]:
    """List the participants that can run, logging the ones skipped."""
    participants = [
        Participant("jaxlstm", sys.executable),
        Participant("flax_naive", sys.executable),
    ]
    optional = [
        ("torch", args.torch_python, "torch", "--torch-python"),
        ("keras", args.tf_python, "tensorflow, keras", "--tf-python"),
    ]
    for name, python, modules, flag in optional:
        if python is None:
            log(f"skipping {name}: pass {flag} to include it")
            continue
        error = check_import(python, modules)
        if error:
            log(
                f"skipping {name}: {python} failed to import {modules}: {error}"
            )
            continue
        participants.append(Participant(name, python))
    return participants


class Runner:
    """Run benchmark processes and collect their JSON result lines."""

    def __init__(
        self, out: Path, peers_dir: Path, quick: bool, cpu_devices: int = 1
    ):
        self.peers_dir = peers_dir
        self.quick = quick
        self.cpu_devices = cpu_devices
        self.results = out / "results.jsonl"
        self.log_path = out / "log.txt"
        self.results.write_text("")
        self.log_path.write_text("")
        self.failures = 0

    def _run(self, label: str, command: list[str], rep: int) -> str | None:
        """Run `command` in the peers folder and return its stdout.

        Its stderr and stdout are appended to the log. Returns None, and
        counts a failure, when the process fails or times out.
        """
        env = {**os.environ, "PEERS_REP": str(rep)}
        started = time.perf_counter()
        with self.log_path.open("a", encoding="utf-8") as log_file:
            log_file.write(f"=== {label}: {' '.join(command)}\n")
            log_file.flush()
            try:
                completed = subprocess.run(
                    command,
                    cwd=self.peers_dir,
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=log_file,
                    text=True,
                    check=False,
                    timeout=PROCESS_TIMEOUT_S,
                )
            except subprocess.TimeoutExpired:
                log(f"  {label} timed out after {PROCESS_TIMEOUT_S} s")
                self.failures += 1
                return None
            log_file.write(completed.stdout)
        seconds = time.perf_counter() - started
        if completed.returncode != 0:
            log(
                f"  {label} failed with exit status {completed.returncode} "
                f"(see {self.log_path})"
            )
            self.failures += 1
            return None
        log(f"  {label} ok ({seconds:.0f} s)")
        return completed.stdout

    def _append(self, label: str, lines: list[str]) -> None:
        """Append the JSON object lines among `lines` to the results."""
        found = [line for line in lines if line.startswith("{")]
        if not found:
            log(f"  {label} printed no JSON result line")
            self.failures += 1
            return
        for line in found:
            json.loads(line)  # fail here, not in the report, on bad JSON
        with self.results.open("a", encoding="utf-8") as results:
            results.write("\n".join(found) + "\n")

    def run_peak(self, python: str, libraries: str, rep: int) -> None:
        """Measure the matrix product peak with `libraries`."""
        reps = QUICK_PEAK_REPS if self.quick else PEAK_REPS
        command = [python, "peak.py", "--libs", libraries, "--reps", str(reps)]
        label = f"peak {libraries} rep {rep}"
        stdout = self._run(label, command, rep)
        if stdout is not None:
            self._append(label, stdout.strip().splitlines()[-1:])

    def run_participant(
        self, participant: Participant, config: str, rep: int
    ) -> None:
        """Train and generate with one participant on one config."""
        label = f"{participant.name} {config} rep {rep}"
        quick = ["--quick"] if self.quick else []
        if participant.name != "jaxlstm":
            script = PEER_SCRIPTS[participant.name]
            command = [participant.python, script, "--config", config, *quick]
            stdout = self._run(label, command, rep)
            if stdout is not None:
                self._append(label, stdout.strip().splitlines()[-1:])
            return

        # speed.py prints a table on stdout and its result lines to --json.
        with tempfile.TemporaryDirectory() as folder:
            json_path = Path(folder) / "speed.jsonl"
            command = [
                participant.python,
                str(SPEED_SCRIPT),
                "--preset",
                config,
                "--rep",
                str(rep),
                "--json",
                str(json_path),
                "--cpu-devices",
                str(self.cpu_devices),
                *quick,
            ]
            stdout = self._run(label, command, rep)
            if stdout is not None:
                text = json_path.read_text(encoding="utf-8")
                self._append(label, text.splitlines())


def run_repetitions(
    runner: Runner,
    participants: list[Participant],
    configs: list[str],
    reps: int,
) -> None:
    """Run `reps` repetitions of the peak and of every participant."""
    for rep in range(1, reps + 1):
        order = participants if rep % 2 else participants[::-1]
        names = " ".join(p.name for p in order)
        log(f"repetition {rep}/{reps}: {names}")
        runner.run_peak(sys.executable, "numpy,jax", rep)
        torch = [p for p in participants if p.name == "torch"]
        if torch:
            runner.run_peak(torch[0].python, "torch", rep)
        for config in configs:
            for participant in order:
                runner.run_participant(participant, config, rep)


def read_results(path: Path) -> list[dict]:
    """Read the JSON object lines of a results file."""
    with path.open(encoding="utf-8") as results:
        return [json.loads(line) for line in results if line.startswith("{")]


def matmul_peak(rows: list[dict]) -> float | None:
    """Return the matrix product peak in GFLOP/s.

    Per repetition, the peak is the best `square` (2048^3) rate over the
    libraries measured; the result is the median over repetitions.
    """
    best = defaultdict(float)
    for row in rows:
        if row.get("peer") != "peak":
            continue
        for entry in row["libs"].values():
            square = entry["gflops"]["square"]
            best[row["rep"]] = max(best[row["rep"]], square)
    return statistics.median(best.values()) if best else None


def first_result_s(row: dict) -> float | None:
    """Return the seconds until a participant's first training result.

    jaxlstm's `first_step_s` includes tracing and compilation; flax_naive
    times its first step after compiling ahead of time, so its lowering and
    compilation are added back.
    """
    if row["peer"] == "flax_naive" and row.get("compile_s") is not None:
        return row["lower_s"] + row["compile_s"] + row["first_step_s"]
    return row.get("first_step_s")


def generation_tok_s(row: dict) -> float | None:
    """Return batch-1 generation tokens/s of a result line.

    The compiled scan's rate is used where the line has one, else the
    Python loop's.
    """
    return row.get("gen_scan_tok_s") or row.get("gen_loop_tok_s")


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ratio_cell(ratios: list[float]) -> str:
    if not ratios:
        return "-"
    cell = f"{statistics.median(ratios):.2f}"
    if len(ratios) > 1:
        cell += f" ({min(ratios):.2f}–{max(ratios):.2f})"
    return cell


def _number_cell(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def per_rep_ratios(
    ours: dict[int, dict], theirs: dict[int, dict]
) -> tuple[list[float], list[float]]:
    """Divide jaxlstm's rates by a participant's, repetition by repetition.

    Args:
      ours: jaxlstm's result lines by repetition.
      theirs: the participant's result lines by repetition.

    Returns:
      The training tokens/s ratios and the generation tokens/s ratios of
      the repetitions that measured both.
    """
    train, gen = [], []
    for rep, row in theirs.items():
        if rep not in ours:
            continue
        if row.get("train_tok_s") and ours[rep].get("train_tok_s"):
            train.append(ours[rep]["train_tok_s"] / row["train_tok_s"])
        if generation_tok_s(row) and ours[rep].get("gen_scan_tok_s"):
            gen.append(ours[rep]["gen_scan_tok_s"] / generation_tok_s(row))
    return train, gen


def summary_rows(
    rows: list[dict], config: str, peak: float | None, ours_name: str
):
    """Yield one table row of cells per participant measured on `config`.

    `ours_name` is the `peer` field of jaxlstm's result lines.
    """
    by_peer = defaultdict(dict)  # peer -> rep -> result line
    for row in rows:
        if row.get("config") == config and row.get("peer") != "peak":
            by_peer[row["peer"]][row["rep"]] = row
    order = [ours_name, "flax_naive", "torch", "keras"]
    peers = sorted(
        by_peer, key=lambda p: (order.index(p) if p in order else 9, p)
    )
    for peer in peers:
        reps = by_peer[peer]
        if peer == ours_name:
            train_ratios = gen_ratios = [1.0]  # shown as "1.00", no range
        else:
            ours = by_peer.get(ours_name, {})
            train_ratios, gen_ratios = per_rep_ratios(ours, reps)

        tok_s = [
            r["train_tok_s"] for r in reps.values() if r.get("train_tok_s")
        ]
        median_tok_s = _median(tok_s)
        flops = next(iter(reps.values()))["flops"]["train"]
        share = "-"
        if median_tok_s and peak:
            share = f"{100 * median_tok_s * flops / (peak * 1e9):.1f}%"
        firsts = [first_result_s(r) for r in reps.values()]
        gens = [generation_tok_s(r) for r in reps.values()]
        yield [
            config,
            peer,
            _number_cell(median_tok_s),
            _ratio_cell(train_ratios),
            share,
            _number_cell(_median([s for s in firsts if s is not None]), 2),
            _number_cell(_median([g for g in gens if g is not None])),
            _ratio_cell(gen_ratios),
        ]


def print_summary(rows: list[dict], cpu_devices: int) -> None:
    """Print jaxlstm against every peer, per config, as a Markdown table."""
    # The names benchmarks/speed.py gives its result lines.
    ours_name = "jaxlstm" if cpu_devices == 1 else f"jaxlstm_{cpu_devices}cpu"
    peak = matmul_peak(rows)
    reps = sorted({row["rep"] for row in rows})
    print()
    print(
        f"# jaxlstm against each peer, {len(reps)} repetition(s); ratios are "
        "jaxlstm / peer inside each repetition, median (min–max)"
    )
    if peak:
        print(
            "# matrix product peak: best 2048^3 GFLOP/s over libraries per "
            f"repetition, median over repetitions = {peak:.0f}"
        )

    header = [
        "config",
        "participant",
        "train tok/s",
        "jaxlstm train ×",
        "% peak",
        "first step s",
        "gen tok/s",
        "jaxlstm gen ×",
    ]
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for config in CONFIGS:
        for cells in summary_rows(rows, config, peak, ours_name):
            print("| " + " | ".join(cells) + " |")

    print()
    print(
        "first step s: wall time of the first training step, tracing and\n"
        "compilation included (flax_naive: lowering + compilation + first\n"
        "step). gen tok/s: greedy batch-1 generation of 200 tokens after a\n"
        "3-token prime. jaxlstm and flax_naive generate in one compiled\n"
        "lax.scan, torch and keras in a Python loop."
    )


def warn_peer_variables() -> None:
    """Warn about PEERS_* variables that change only the peers' settings."""
    inherited = sorted(
        name
        for name in os.environ
        if name.startswith("PEERS_") and name not in OWN_PEER_VARIABLES
    )
    if inherited:
        log(
            f"warning: {', '.join(inherited)} set in the environment change "
            "the peer scripts' settings but not benchmarks/speed.py's; unset "
            "them for a like-for-like comparison"
        )


def parse_args() -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--peers-dir",
        type=Path,
        required=True,
        help="folder with peak.py, report.py and the peer scripts",
    )

    parser.add_argument(
        "--reps", type=int, default=3, help="repetitions (default 3)"
    )
    parser.add_argument(
        "--config",
        choices=("word", "char", "all"),
        default="all",
        help="model configuration to run (default all)",
    )

    parser.add_argument(
        "--torch-python",
        help="Python with torch installed; without it torch is skipped",
    )
    parser.add_argument(
        "--tf-python",
        help="Python with tensorflow and keras 3; without it keras is skipped",
    )

    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=1,
        metavar="N",
        help="train jaxlstm on N fake CPU devices with pmap "
        "(benchmarks/speed.py --cpu-devices; default 1)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="pass --quick to every script, for a smoke test",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for results.jsonl and log.txt, both overwritten "
        "(default: a new temporary folder)",
    )
    args = parser.parse_args()

    if args.reps < 1:
        parser.error(f"--reps must be 1 or more, got {args.reps}")
    missing = [
        name for name in REQUIRED_FILES if not (args.peers_dir / name).is_file()
    ]
    if missing:
        parser.error(
            f"{', '.join(missing)} not found in --peers-dir "
            f"{args.peers_dir}; pass the folder that contains the peer "
            "benchmark scripts"
        )
    return args


def main() -> None:
    args = parse_args()
    peers_dir = args.peers_dir.resolve()
    out = args.out or Path(tempfile.mkdtemp(prefix="jaxlstm-compare-"))
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    warn_peer_variables()

    participants = find_participants(args)
    configs = list(CONFIGS) if args.config == "all" else [args.config]
    names = ", ".join(p.name for p in participants)
    log(
        f"participants: {names}; configs: {', '.join(configs)}; "
        f"repetitions: {args.reps}; results: {out / 'results.jsonl'}"
    )
    runner = Runner(out, peers_dir, args.quick, args.cpu_devices)
    run_repetitions(runner, participants, configs, args.reps)

    rows = read_results(runner.results)
    if not any(row.get("peer") != "peak" for row in rows):
        log(f"no participant produced a result; see {runner.log_path}")
        sys.exit(1)
    sys.stdout.flush()
    report = subprocess.run(
        [sys.executable, str(peers_dir / "report.py"), str(runner.results)],
        check=False,
    )
    if report.returncode != 0:
        log(f"report.py failed with exit status {report.returncode}")
    print_summary(rows, args.cpu_devices)
    log(f"results: {runner.results}; log: {runner.log_path}")
    if runner.failures:
        log(f"{runner.failures} process(es) failed; see {runner.log_path}")
        sys.exit(1)


if __name__ == "__main__":
    main()
