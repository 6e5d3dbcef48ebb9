"""The seed's hardware table re-derived by the planner, with a verdict on each seed cell.

Verdicts (for the seed's GPUs, both models in the checkpoint's precision, batch 1):
``fits`` (resident, as the seed assumed), ``fits only with sequential`` (resident does
not), ``fits with stream`` (neither does), ``does not fit``. A count above one machine
(8 GPUs) is judged as if it were one machine, and flagged as beyond one machine. Where
neither resident nor sequential runs on one machine and ``stream`` fits, the cell adds
the streamed run on the one GPU it uses, with its estimated minutes and cost. nf4 is
never a verdict: it changes the numbers, so auto never picks it.
"""

from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import yaml

from lens_compare.hardware.gpus import gpu_catalog
from lens_compare.hardware.machine import MAX_GPUS_PER_MACHINE
from lens_compare.hardware.planner import Plan, plan_pair


@dataclass(frozen=True)
class Verdict:
    option: str
    verdict: str
    # The streamed run on the GPUs it uses ("1 GPU, ~11 min, $0.84"), where it is the
    # way to run the pair on one machine.
    stream: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {"option": self.option, "verdict": self.verdict, "stream": self.stream}

    def markdown(self) -> str:
        if self.verdict == "fits with stream":
            return f"{self.option}: **fits with stream** ({self.stream})"
        stream = f", or **fits with stream** ({self.stream})" if self.stream else ""
        return f"{self.option}: **{self.verdict}**{stream}"


@cache
def seed_table() -> dict[str, Any]:
    return yaml.safe_load(resources.files("lens_compare.hardware").joinpath("seed_table.yaml").read_text())


def _options(text: str) -> list[tuple[int, str]]:
    out = []
    for part in text.split("|"):
        count, _, gpu = part.strip().partition(" ")
        out.append((int(count), gpu))
    return out


def _streamed(pair: str, tokens: int, count: int, gpu: str) -> str:
    plan = plan_pair(pair, tokens=tokens, gpu=gpu, count=count, strategy="stream", with_cheapest=False)
    run = plan.chosen
    cost = f", ${run.est_cost_usd:.2f}" if run.est_cost_usd is not None else ""
    return f"{count} GPU{'s' if count > 1 else ''}, ~{run.est_seconds / 60:.0f} min{cost}"


def judge(pair: str, tokens: int, count: int, gpu: str) -> Verdict:
    plan = plan_pair(pair, tokens=tokens, gpu=gpu, count=count, with_cheapest=False)
    beyond = " (beyond one machine)" if count > MAX_GPUS_PER_MACHINE else ""
    label = f"{count}× {gpu}"
    if plan.strategies["resident"].fits:
        return Verdict(label, f"fits{beyond}")
    sequential, stream = plan.strategies["sequential"], plan.strategies["stream"]
    streamed = None
    if stream.fits and (beyond or not sequential.fits):
        streamed = _streamed(pair, tokens, stream.min_gpus, gpu)
    if sequential.fits:
        return Verdict(label, f"fits only with sequential{beyond}", streamed)
    if stream.fits:
        return Verdict(label, "fits with stream", streamed)
    return Verdict(label, f"does not fit{beyond}")


def planner_pick(pair: str, tokens: int) -> str:
    """The smallest resident configuration: fewest GPUs, then the least memory per GPU."""
    best: tuple[tuple[int, float], str] | None = None
    for gpu in gpu_catalog().values():
        plan: Plan = plan_pair(pair, tokens=tokens, gpu=gpu.name, count=1, with_cheapest=False, only=("resident",))
        n = plan.strategies["resident"].min_gpus
        if n is not None and (best is None or (n, gpu.usable_gib) < best[0]):
            best = ((n, gpu.usable_gib), f"{n}× {gpu.name}")
    if best:
        return best[1]
    plan = plan_pair(pair, tokens=tokens, gpu="H200", count=1, with_cheapest=False, only=("resident",))
    need = plan.beyond_one_machine or {}
    return "beyond one machine: " + ", ".join(f"{n}× H200 {p}" for p, n in need.items() if n)


def render_table() -> str:
    """Markdown: planner pick | seed cell + verdict, for every pair and token count."""
    table = seed_table()
    header = "| pair | " + " | ".join(f"{t} tokens" for t in table["tokens"]) + " |"
    lines = [header, "|" + " --- |" * (len(table["tokens"]) + 1)]
    for pair, cells in table["rows"].items():
        row = []
        for tokens, (seed_text, options) in zip(table["tokens"], cells, strict=True):
            verdicts = [judge(pair, tokens, n, g) for n, g in _options(options)]
            seed = "; ".join(v.markdown() for v in verdicts)
            row.append(f"planner: {planner_pick(pair, tokens)}<br>seed: {seed_text} → {seed}")
        lines.append(f"| {pair} | " + " | ".join(row) + " |")
    return "\n".join(lines)
