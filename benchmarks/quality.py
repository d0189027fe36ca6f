"""Answer quality: does MoA answer short questions better than its own model alone?

    python benchmarks/quality.py                   # the embedded model: every strategy
    python benchmarks/quality.py --limit 20        # a quick pass on the first 20 questions
    python benchmarks/quality.py --preset together # one pipeline (hosted too) vs its aggregator

The questions are the project's own (benchmarks/data/quality.jsonl: arithmetic, facts, units
and dates, simple reasoning, each with accepted answers). Every system runs through `moa batch`
(a subprocess, as a user would run it) and is scored by `moa eval match`'s library functions
(`auto` matching: numbers by value, words as whole words), then compared with the first
system, the model alone and greedy, row by row (exact McNemar test).

On the embedded model one run compares the model alone (greedy and sampled), majority vote of
k samples, MoA with each aggregation strategy at 2 and 3 layers, `confidence` with k = 3, 5, 7,
and the `local` preset as shipped. The candidates are the preset's own agent settings: a greedy
answer plus samples with explicit seeds, so runs are reproducible, and since every upstream
call is cached (keyed by model, messages, sampling settings and sample index) in the
benchmark's own cache file, the same candidate is generated once and reused by every strategy.

Seconds per question are what a question costs without the cache: each call's own generation
time, taken from the run where it was generated (the embedded model runs one call at a time,
so a question costs the sum of its calls). The full table goes to BENCHMARKS.md (unless
--limit, --no-write, or a --config/--preset run).
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from moa.evaluation.accuracy import ScoredSystem, compare, load_scored
from moa.presets import PRESETS

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "quality.jsonl"
BENCHMARKS_MD = HERE.parent / "BENCHMARKS.md"
START, END = "<!-- quality:start -->", "<!-- quality:end -->"
MOA = [sys.executable, "-m", "moa"]

#: Seeds of the sampled candidates: candidate i (i >= 1) samples with SEED + i.
SEED = 1000
#: Sampling settings an agent may carry (the rest of the preset is layout).
_SAMPLING = (
    "temperature",
    "max_tokens",
    "top_p",
    "system",
    "frequency_penalty",
    "presence_penalty",
    "stop",
    "repeat_penalty",
    "min_p",
)


@dataclass(frozen=True, slots=True)
class System:
    name: str
    label: str
    config: dict[str, Any]


# --- the systems ----------------------------------------------------------------------------


def _local_settings() -> tuple[dict[str, Any], float]:
    """The `local` preset's per-call settings, and the temperature its samples use."""
    preset = PRESETS["local"]
    settings = {k: copy.deepcopy(preset[k]) for k in _SAMPLING if k in preset}
    temperatures = [a["temperature"] for a in preset["proposers"] if a.get("temperature", 0.7) > 0]
    return settings, (temperatures[0] if temperatures else settings.get("temperature", 0.7))


def _candidates(k: int, temperature: float) -> list[dict[str, Any]]:
    """Candidate 0 answers greedily; candidates 1..k-1 sample with their own seeds."""
    greedy = {"provider": "local", "temperature": 0.0}
    return [greedy] + [
        {"provider": "local", "temperature": temperature, "seed": SEED + i} for i in range(1, k)
    ]


def _pipeline(
    settings: dict[str, Any],
    proposers: list[dict[str, Any]],
    strategy: str,
    layers: int,
    threads: int | None,
) -> dict[str, Any]:
    local: dict[str, Any] = {"type": "llama-cpp"}
    if threads:
        local["n_threads"] = threads
    aggregator: dict[str, Any] = {"provider": "local", "temperature": 0.0}
    if strategy != "synthesize":
        aggregator["strategy"] = strategy
    return {
        "providers": {"local": local},
        "proposers": proposers,
        "aggregator": aggregator,
        "layers": layers,
        # A slow shared machine must not turn queueing behind other calls into failures.
        "timeout": 900,
        **settings,
    }


def _seeded_preset(name: str) -> dict[str, Any]:
    """A preset with seeds on its unseeded sampling agents, so the run can be reproduced."""
    config = copy.deepcopy(PRESETS[name])
    offset = 0
    for agent in config.get("proposers", []):
        if agent.get("temperature", config.get("temperature", 0.7)) > 0 and "seed" not in agent:
            agent["seed"] = SEED + offset  # as candidate `offset` of embedded_systems
        offset += agent.get("samples", 1)
    config["timeout"] = 900  # the benchmark's deadline, as for every system it runs
    return config


def embedded_systems(threads: int | None) -> list[System]:
    """The systems that make calls; the rest are read from the first one (see `derive`)."""
    settings, temperature = _local_settings()

    def moa(k: int, strategy: str, layers: int) -> dict[str, Any]:
        return _pipeline(settings, _candidates(k, temperature), strategy, layers, threads)

    plain = _pipeline({"max_tokens": settings.get("max_tokens", 512)}, [], "synthesize", 1, threads)
    del plain["proposers"]
    systems = [System(CANDIDATES, "confidence, k=7", moa(7, "confidence", 2))]
    if set(settings) - {"max_tokens"}:  # else the same call as the greedy candidate
        systems.append(System("alone-plain", "SmolLM2 alone, greedy, as is", plain))
    for layers in (2, 3):
        for strategy in ("select", "synthesize", "vote", "confidence"):
            if layers == 2 and strategy in ("vote", "confidence"):
                continue  # read from the candidates' run
            systems.append(
                System(
                    f"{strategy}-3x{layers}",
                    f"MoA {strategy}, 3 candidates, {layers} layers",
                    moa(3, strategy, layers),
                )
            )
    if preset_as_derived(settings, temperature) is None:  # not read from the candidates
        preset = _seeded_preset("local")
        if threads:
            preset["providers"]["local"]["n_threads"] = threads
        systems.append(System("local-preset", "the `local` preset (seeded)", preset))
    return systems


def preset_as_derived(settings: dict[str, Any], temperature: float) -> Derived | None:
    """The seeded `local` preset as a row read from the candidates, if it is `confidence` over
    the first k of them (k <= 7); None if it must run on its own."""
    from moa.config import parse_config

    preset = _seeded_preset("local")
    k = sum(a.get("samples", 1) for a in preset.get("proposers", []))
    if k > 7:
        return None
    ours = _pipeline(settings, _candidates(k, temperature), "confidence", 2, None)
    mine, theirs = (parse_config(c).resolve() for c in (preset, ours))
    aggregation = mine.aggregation
    if (
        len(mine.layers) != 1
        or mine.layers[0].agents != theirs.layers[0].agents
        or aggregation.strategy != "confidence"
    ):
        return None
    label = f"the `local` preset (seeded): confidence, k={k}"
    if aggregation.agreement_weight:
        label += f", agreement weight {aggregation.agreement_weight:g}"
    return Derived("local-preset", label, k, aggregation.measure, aggregation.agreement_weight)


def pipeline_systems(config_path: Path | None, preset: str | None) -> list[System]:
    """One pipeline, and its aggregator's model alone at temperature 0 as the baseline."""
    if config_path is not None:
        data = yaml.safe_load(config_path.read_text(encoding="utf-8"))
        name = config_path.stem
    else:
        assert preset is not None
        data, name = _seeded_preset(preset), preset
    if "pipelines" in data or "aggregator" not in data:
        sys.exit("quality.py: give a config with one inline pipeline (proposers + aggregator)")
    aggregator = {
        k: v for k, v in data["aggregator"].items() if k not in ("fallbacks", "strategy", "window")
    }
    alone = {k: v for k, v in data.items() if k not in ("proposers", "layers", "aggregator")}
    alone.update({"aggregator": {**aggregator, "temperature": 0.0}, "layers": 1})
    model = aggregator.get("model", "the model")
    return [
        System("alone-greedy", f"{model} alone, greedy", alone),
        System(name, f"{name} pipeline", data),
    ]


# --- running --------------------------------------------------------------------------------


def run_batch(
    system: System, rows: Path, work: Path, cache: Path, concurrency: int
) -> tuple[Path, float]:
    config = work / f"{system.name}.yaml"
    config.write_text(yaml.safe_dump(system.config, sort_keys=False), encoding="utf-8")
    output = work / f"{system.name}.jsonl"
    output.unlink(missing_ok=True)  # stale rows must not count
    _seed_from_shards(output, rows, work.parent if work.name.startswith("shard-") else work)
    started = time.monotonic()
    command = [
        *MOA,
        "batch",
        str(rows),
        "-o",
        str(output),
        "--config",
        str(config),
        "--cache",
        str(cache),
        "-j",
        str(concurrency),
        "--generator",
        system.name,
        "--progress-interval",
        "60",
    ]
    done = subprocess.run(command, stdin=subprocess.DEVNULL, check=False)
    if done.returncode not in (0, 1):  # 1: some rows failed, which scores them wrong
        sys.exit(f"quality.py: {shlex.join(command)} exited {done.returncode}")
    return output, time.monotonic() - started


def _seed_from_shards(output: Path, rows: Path, root: Path) -> None:
    """Start `output` with this system's finished rows from earlier shard runs, so `moa batch`
    resumes after them: calls asking for log-probabilities bypass the call cache, and this is
    how a sharded run's answers reach the final table without being generated again."""
    wanted = {str(json.loads(line).get("id")) for line in rows.read_text().splitlines() if line}
    kept: dict[str, str] = {}
    for shard in sorted(root.glob(f"shard-*/{output.name}")):
        if shard.resolve() == output.resolve():
            continue
        for line in shard.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            key = str(record.get("id"))
            if record.get("ok") and key in wanted:
                kept.setdefault(key, line)
    if kept:
        output.write_text("".join(line + "\n" for line in kept.values()), encoding="utf-8")


def _merged(config: dict[str, Any], agent: dict[str, Any]) -> dict[str, Any]:
    settings = {k: config[k] for k in _SAMPLING if k in config}
    settings.update({k: v for k, v in agent.items() if k != "provider"})
    return settings


def call_ids(system: System) -> tuple[list[list[str]], str]:
    """What identifies each call of a system (as the cache does): for a layer-1 call its
    settings, index and whether it asks for log-probabilities; for a later call also every
    call before it. Two systems sharing a call share its identity, and so its cost."""
    config = system.config
    logprobs = config.get("aggregator", {}).get("strategy") == "confidence"
    proposers = config.get("proposers", [])
    layers: list[list[str]] = []
    for _ in range(1, config.get("layers", 2)):
        earlier = layers[-1] if layers else []
        layers.append(
            [
                json.dumps([earlier, _merged(config, a), i, logprobs], sort_keys=True)
                for i, a in enumerate(proposers)
            ]
        )
    if not layers:  # the model alone: its one call is a layer-1 call
        return [], json.dumps([[], _merged(config, config["aggregator"]), 0, False], sort_keys=True)
    return layers, json.dumps(config, sort_keys=True)


def record_own_seconds(output: Path, table: dict[tuple[str, str], float], system: System) -> None:
    """Each call's own generation time, by call identity (see the module docstring).

    Agents of one layer start together and the embedded model serves them one after another,
    so sorted by latency each call's own time is its latency minus the one before it; a call
    answered from the cache takes milliseconds and so adds nothing. The largest time seen for
    an identity is the run that really generated it."""
    layer_ids, aggregator_id = call_ids(system)
    for line in output.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        row = str(record["id"])
        for run in record.get("runs", []):
            for ids, layer in zip(layer_ids, run.get("layers", []), strict=False):
                previous = 0.0
                for i in sorted(range(len(layer)), key=lambda i: layer[i].get("latency_s", 0.0)):
                    latency = layer[i].get("latency_s", 0.0)
                    if i < len(ids):
                        key = (row, ids[i])
                        table[key] = max(table.get(key, 0.0), latency - previous)
                    previous = latency
            latency = (run.get("aggregator") or {}).get("latency_s", 0.0)
            table[(row, aggregator_id)] = max(table.get((row, aggregator_id), 0.0), latency)


def seconds_per_question(
    scored: ScoredSystem, table: dict[tuple[str, str], float], system: System
) -> float:
    layer_ids, aggregator_id = call_ids(system)
    ids = [i for layer in layer_ids for i in layer] + [aggregator_id]
    total = sum(table.get((row.id, i), 0.0) for row in scored.rows for i in ids)
    return total / len(scored.rows) if scored.rows else 0.0


# --- rows read from the candidates' run -----------------------------------------------------
#
# Calls that ask for log-probabilities are never answered from the call cache (it keeps none),
# so each `confidence` run would generate its candidates again. Instead one run generates k=7
# candidates (greedy + 6 samples) with their scores, and the systems that only choose among
# the first k of them are read from its records with the strategies' own rules: the model
# alone (candidate 0 is its greedy answer, candidate 1 a sample), `vote` over k (the library's
# own `moa.strategies.vote`), `confidence` over k (the highest recorded score; ties go to the
# earliest). No call is made for these rows; their calls, tokens and seconds are those of the
# candidates they read.

CANDIDATES = "confidence-7"


@dataclass(frozen=True, slots=True)
class Derived:
    name: str
    label: str
    #: Candidates read (the first k), and how the answer is chosen among them: "first",
    #: "second", "vote", or a confidence measure ("mean_logprob", "certainty").
    k: int
    rule: str
    #: confidence only: the strategy's agreement_weight.
    weight: float = 0.0


def derived_systems() -> list[Derived]:
    rows = [
        Derived("alone-greedy", "SmolLM2 alone, greedy", 1, "first"),
        Derived("alone-sampled", "SmolLM2 alone, one sample (T=0.7)", 2, "second"),
    ]
    for k in (3, 5, 7):
        rows.append(Derived(f"vote-{k}", f"majority vote of {k} (greedy + samples)", k, "vote"))
    for k in (3, 5, 7):
        rows.append(Derived(f"confidence-{k}", f"confidence, k={k}", k, "mean_logprob"))
    for k in (5, 7):
        rows.append(Derived(f"certainty-{k}", f"confidence by certainty, k={k}", k, "certainty"))
    for k in (5, 7):
        rows.append(
            Derived(
                f"agreement-{k}",
                f"confidence + agreement (weight 10), k={k}",
                k,
                "mean_logprob",
                10.0,
            )
        )
    return rows


def _choose(candidates: list[dict[str, Any]], scores: list[dict[str, Any]], d: Derived) -> int:
    """Position (in `candidates`, the usable ones) of the one `d` chooses."""
    from moa.results import AgentResult
    from moa.strategies import agreement, vote

    if d.rule in ("first", "second"):
        return 0 if d.rule == "first" else min(1, len(candidates) - 1)
    texts = [c.get("output", "") for c in candidates]
    if d.rule == "vote":
        results = [AgentResult(1, i, "local", "m", "ok", output=t) for i, t in enumerate(texts)]
        return vote(results).chosen
    agree = agreement(texts)  # among these k, as the strategy computes it
    values = [s.get(d.rule) for s in scores]
    if any(v is None for v in values):  # as the strategy does: agreement alone, then
        combined = agree
    else:
        combined = [float(v) + d.weight * a for v, a in zip(values, agree, strict=True)]
    return max(range(len(candidates)), key=lambda i: (round(combined[i], 9), -i))


def derive(candidates_output: Path, derived: Derived, work: Path) -> Path:
    """A batch-shaped output of `derived`, read from the candidates' run."""
    lines = []
    for line in candidates_output.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        run = (record.get("runs") or [{}])[-1]
        layer = (run.get("layers") or [[]])[0][: derived.k]
        scores = {s["index"]: s for s in (run.get("aggregation") or {}).get("scores", [])}
        positions = [i for i, c in enumerate(layer) if c.get("ok")]
        ok = bool(positions) and (derived.rule not in ("first", "second") or 0 in positions)
        output = ""
        if ok:
            chosen = _choose(
                [layer[i] for i in positions], [scores.get(i, {}) for i in positions], derived
            )
            output = layer[positions[chosen]].get("output", "")
        tokens = sum(c.get("usage", {}).get("total_tokens", 0) for c in layer)
        latency = [c.get("latency_s", 0.0) for c in layer]
        lines.append(
            json.dumps(
                {
                    "id": record["id"],
                    "ok": ok,
                    "output": output,
                    "generator": derived.name,
                    "usage": {"total_tokens": tokens},
                    "latency_s": max(latency, default=0.0),
                    "runs": [{"layers": [layer], "aggregator": {"usage": {"total_tokens": 0}}}],
                    "row": record.get("row"),
                }
            )
        )
    path = work / f"{derived.name}.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# --- reporting ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    label: str
    scored: ScoredSystem
    seconds: float


def _table(rows: list[Row]) -> list[str]:
    base = rows[0].scored
    lines = [
        "| system | accuracy % ± SE | vs first row, points ± paired SE | McNemar p "
        "| calls/q | tokens/q | s/q |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        overall = row.scored.overall
        if row is rows[0]:
            gain, p = "(baseline)", ""
        else:
            paired = compare(base, row.scored)
            gain = f"{100 * paired.difference:+.1f} ± {100 * paired.standard_error:.1f}"
            p = f"{paired.p_value:.3g}"
        lines.append(
            f"| {row.label} | {100 * overall.accuracy:.1f} ± "
            f"{100 * overall.standard_error:.1f} | {gain} | {p} | "
            f"{row.scored.mean('calls'):.1f} | {row.scored.mean('tokens'):.0f} | "
            f"{row.seconds:.2f} |"
        )
    return lines


def _categories(rows: list[Row]) -> list[str]:
    names = [c.category for c in rows[0].scored.categories]
    lines = ["| system | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for row in rows:
        by_name = {c.category: c for c in row.scored.categories}
        cells = [f"{100 * by_name[n].accuracy:.0f}" if n in by_name else "" for n in names]
        lines.append(f"| {row.scored.name} | " + " | ".join(cells) + " |")
    return lines


def spread(lines: list[str], n: int) -> list[str]:
    """n lines spread evenly over `lines` (the file is grouped by family: keep them all)."""
    if n >= len(lines):
        return lines
    return [lines[(i * len(lines)) // n] for i in range(n)]


def _public_args(argv: list[str]) -> list[str]:
    """The command line without --work (a local path that says nothing about the figures)."""
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--work":
            skip = True
        elif not arg.startswith("--work="):
            kept.append(arg)
    return kept


def write_benchmarks_md(section: str) -> None:
    text = BENCHMARKS_MD.read_text(encoding="utf-8")
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        text = f"{head}{START}\n{section}{END}{tail}"
    else:
        text = f"{text.rstrip()}\n\n{START}\n{section}{END}\n"
    BENCHMARKS_MD.write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--config", type=Path, help="a pipeline config (one inline pipeline)")
    which.add_argument("--preset", help="a preset (seeds are added to its sampling agents)")
    parser.add_argument(
        "--limit", type=int, help="only N questions, spread evenly over the file (every family)"
    )
    parser.add_argument(
        "--shard",
        metavar="I/N",
        help="run only every N-th question from the I-th (1-based), in a directory of its own; "
        "several shards at once use several cores, and a final run without --shard then "
        "finds every call in the shared cache and takes the seconds from the shards",
    )
    parser.add_argument("--only", help="comma-separated system names to run, in this order")
    parser.add_argument("--data", type=Path, default=DATA, help="the questions (JSONL)")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "moa-quality",
        help="where configs, outputs and the benchmark's own call cache go",
    )
    parser.add_argument("-j", "--concurrency", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads")
    parser.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md alone")
    args = parser.parse_args()

    hosted = args.config is not None or args.preset not in (None, "local")
    if args.config is not None or args.preset is not None:
        systems = pipeline_systems(args.config, args.preset)
    else:
        systems = embedded_systems(args.threads)
    if args.only:
        wanted = args.only.split(",")
        unknown = set(wanted) - {s.name for s in systems}
        if unknown:
            sys.exit(f"quality.py: no system {', '.join(sorted(unknown))}")
        by_name = {s.name: s for s in systems}
        systems = [by_name[name] for name in wanted]  # in the order given
    work = args.work
    lines = [line for line in args.data.read_text(encoding="utf-8").splitlines() if line.strip()]
    if args.limit:
        lines = spread(lines, args.limit)
    if args.shard:
        index, count = (int(x) for x in args.shard.split("/"))
        work = work / f"shard-{index}-of-{count}-from-{len(lines)}"
        lines = lines[index - 1 :: count]
    work.mkdir(parents=True, exist_ok=True)
    rows_path = work / "questions.jsonl"
    rows_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    # One row at a time on the embedded model: it serves one call at a time anyway, and
    # parallel rows would only queue; hosted pipelines get the usual concurrency.
    concurrency = args.concurrency or (16 if hosted else 1)

    table: dict[tuple[str, str], float] = {}
    results: dict[str, Row] = {}
    started = time.monotonic()
    for system in systems:
        print(f"== {system.name}: {system.label}", file=sys.stderr, flush=True)
        output, wall = run_batch(system, rows_path, work, args.work / "calls.sqlite3", concurrency)
        scored = load_scored(output, name=system.name)
        for shard_output in [output, *sorted(args.work.glob(f"shard-*/{system.name}.jsonl"))]:
            record_own_seconds(shard_output, table, system)
        seconds = scored.mean("seconds") if hosted else seconds_per_question(scored, table, system)
        results[system.name] = Row(system.label, scored, seconds)
        print(f"   {100 * scored.overall.accuracy:.1f} % in {wall:.0f} s", file=sys.stderr)
        if system.name == CANDIDATES and not hosted:
            layer_ids, _ = call_ids(system)
            settings, temperature = _local_settings()
            derived = derived_systems()
            preset = preset_as_derived(settings, temperature)
            if preset is not None:
                derived.append(preset)
            for d in derived:
                if d.name == CANDIDATES:
                    continue
                path = derive(output, d, work)
                part = load_scored(path, name=d.name)
                ids = layer_ids[0][: d.k]
                per_q = sum(table.get((r.id, i), 0.0) for r in part.rows for i in ids)
                results[d.name] = Row(d.label, part, per_q / max(1, len(part.rows)))
    order = [
        "alone-greedy",
        "alone-sampled",
        "alone-plain",
        "vote-3",
        "vote-5",
        "vote-7",
        "confidence-3",
        "confidence-5",
        CANDIDATES,
        "certainty-5",
        "certainty-7",
        "agreement-5",
        "agreement-7",
    ]
    rows = [results.pop(n) for n in order if n in results]
    rows += [results.pop(n) for n in list(results) if n != "local-preset"]
    rows += [results.pop(n) for n in list(results)]
    total = time.monotonic() - started
    command = shlex.join(["python", "benchmarks/quality.py", *_public_args(sys.argv[1:])])
    n = len(rows[0].scored.rows)
    section = "\n".join(
        [
            f"`{command}` — {n} questions, matched by `auto` (numbers by value, words as "
            f"whole words); the whole run took {total / 60:.1f} min.",
            "",
            *_table(rows),
            "",
            "Accuracy per category (%):",
            "",
            *_categories(rows),
            "",
        ]
    )
    print(section)
    if not (args.limit or args.no_write or hosted or args.only or args.shard):
        write_benchmarks_md(section)
        print(f"(written to {BENCHMARKS_MD.name})", file=sys.stderr)


if __name__ == "__main__":
    main()
