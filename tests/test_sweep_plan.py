"""The sweep's pair list (``--pairs``) and its dry run (``--dry-run``), checked against the planner itself."""

import json
import os
import subprocess
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from lens_compare.errors import ConfigError, PairError
from lens_compare.hardware.machine import Machine, catalog_machine
from lens_compare.hardware.planner import plan_pair
from lens_compare.hardware.seed_table import seed_table
from lens_compare.hardware.steering import planned_steering
from lens_compare.hardware.timing import run_cost
from lens_compare.models.pairs import builtin_pairs, parse_pairs
from lens_compare.sweeps.dry_run import PlannedRun, plan_sweep
from lens_compare.sweeps.pairs import expand_pairs

H100_X8 = catalog_machine("h100", 8, None)
CPU = Machine("cpu", 1, 64.0, 64.0)
THREE = ("qwen7b", "llama70b", "deepseek-v3")
LENGTHS = (10, 250)


def _extra(**entries: dict) -> dict:
    return parse_pairs({"pairs": entries}, "pairs.yaml")


def test_seed_is_the_18_pairs_of_the_seeds_table_and_every_one_plans():
    seed = expand_pairs("seed")
    assert len(seed) == 18
    assert set(seed) == set(seed_table()["rows"])
    plan = plan_sweep(seed, [10], n_prompts=1, machine=H100_X8)
    assert [row.pair for row in plan.rows] == list(seed)
    assert all(row.fits for row in plan.rows), [row for row in plan.rows if not row.fits]


def test_all_is_the_registry_then_the_pairs_file_each_once():
    extra = _extra(mine={"base": "Qwen/Qwen2.5-7B", "sft": "Qwen/Qwen2.5-7B-Instruct"},
                   qwen7b={"base": "Qwen/Qwen2.5-7B", "sft": "Qwen/Qwen2.5-7B-Instruct", "note": "shadowed"})
    assert expand_pairs("all", extra) == (*builtin_pairs(), "mine")
    assert expand_pairs("all") == tuple(builtin_pairs())
    assert len(expand_pairs("all")) > len(expand_pairs("seed"))


def test_first_seen_order_and_no_duplicates():
    keys = expand_pairs(" qwen7b,llama8b , qwen7b,seed,llama8b,")
    seed = [key for key in expand_pairs("seed") if key not in ("qwen7b", "llama8b")]
    assert keys == ("qwen7b", "llama8b", *seed)


@pytest.mark.parametrize(("text", "suggestion"), [("qwen7bb", "'qwen7b'"), ("qwen7b,sed", "'seed'"),
                                                  ("llama-8b", "'llama8b'")])
def test_unknown_key_is_refused_with_a_suggestion(text, suggestion):
    with pytest.raises(PairError, match="unknown pair") as raised:
        expand_pairs(text)
    assert f"Did you mean {suggestion}" in str(raised.value) and "--pairs-file" in str(raised.value)


def test_a_pairs_file_key_is_known_only_with_its_file():
    extra = _extra(mine={"base": "Qwen/Qwen2.5-7B", "sft": "Qwen/Qwen2.5-7B-Instruct"})
    assert expand_pairs("mine,qwen7b", extra) == ("mine", "qwen7b")
    with pytest.raises(PairError, match="'mine'"):
        expand_pairs("mine")


@pytest.mark.parametrize("text", ["", " ", ",,", " , "])
def test_empty_list_is_refused(text):
    with pytest.raises(ConfigError, match="names no pair"):
        expand_pairs(text)


def test_rows_are_the_planners_own_choice():
    plan = plan_sweep(THREE, LENGTHS, n_prompts=16, machine=H100_X8)
    assert [(row.pair, row.tokens) for row in plan.rows] == [(p, n) for p in THREE for n in LENGTHS]
    for row in plan.rows:
        direct = plan_pair(row.pair, tokens=row.tokens, batch=16, machine=H100_X8)
        assert direct.chosen is not None
        # Then on no more GPUs than it needs, as the preflight runs it: the rest take other runs.
        narrow = plan_pair(row.pair, tokens=row.tokens, batch=16, machine=H100_X8.with_count(direct.chosen.min_gpus),
                           strategy=direct.strategy)
        chosen = narrow.chosen
        # With the steering check where a run would do it (auto: where it takes at most the run's time).
        steering = planned_steering(narrow, None, (), (0.5, 1.0, 2.0)).added_seconds
        seconds = chosen.est_seconds + steering
        assert row == PlannedRun(row.pair, row.tokens, direct.strategy, chosen.min_gpus, chosen.peak_gib_per_gpu,
                                 seconds, run_cost(seconds, narrow.machine), steering_seconds=steering)
    # The three sizes take three different answers: one GPU, a split, and a stream.
    assert {(row.strategy, row.gpus) for row in plan.rows} == {("resident", 1), ("resident", 4), ("stream", 1)}
    # Loading dominates the two resident runs, so the check costs less than they do; stream does not steer yet.
    assert [row.steering_seconds > 0 for row in plan.rows] == [True, True, True, True, False, False]
    assert all(0 < row.steering_seconds < row.est_seconds / 2 for row in plan.rows[:4])


def test_the_steering_check_counts_where_it_would_run():
    auto = plan_sweep(["qwen7b"], LENGTHS, n_prompts=16, machine=H100_X8)
    off = plan_sweep(["qwen7b"], LENGTHS, n_prompts=16, machine=H100_X8, steer=False)
    assert [row.steering_seconds for row in off.rows] == [0.0, 0.0]
    for with_it, without in zip(auto.rows, off.rows, strict=True):
        assert with_it.est_seconds == pytest.approx(without.est_seconds + with_it.steering_seconds)
    assert "include the steering check in 2 of 2 run(s)" in auto.table()
    assert "steering" not in off.table()
    # On the CPU, SmolLM2-sized forwards outweigh its loading: auto leaves the check out, --steer counts it.
    cpu = plan_sweep(["smollm2-sanity"], [250], n_prompts=16, machine=CPU)
    asked = plan_sweep(["smollm2-sanity"], [250], n_prompts=16, machine=CPU, steer=True)
    assert cpu.rows[0].steering_seconds == 0.0
    assert asked.rows[0].steering_seconds > 4 * cpu.rows[0].est_seconds


def test_totals_add_up_the_rows():
    plan = plan_sweep(THREE, LENGTHS, n_prompts=16, machine=H100_X8)
    seconds = {(row.pair, row.tokens): row.est_seconds for row in plan.rows}
    cost = {(row.pair, row.tokens): row.est_cost_usd for row in plan.rows}
    gpus = {(row.pair, row.tokens): row.gpus for row in plan.rows}
    totals = plan.totals()
    assert (totals.runs, totals.runs_fit, totals.runs_refused) == (6, 6, 0)
    assert totals.seconds == pytest.approx(sum(seconds.values()))
    assert totals.cost_usd == pytest.approx(sum(cost.values()))
    assert totals.seconds_with_prefixes == pytest.approx(sum(seconds[p, 250] for p in THREE))
    assert totals.cost_usd_with_prefixes == pytest.approx(sum(cost[p, 250] for p in THREE))
    # H100 SXM's price, for the GPUs each run takes, for its seconds.
    price = H100_X8.gpu.price_per_hour
    assert totals.cost_usd == pytest.approx(price * sum(gpus[k] * seconds[k] for k in seconds) / 3600)
    # Side by side on the 8 GPUs: the GPU-seconds of the longest lengths over 8, or the longest run.
    longest = [(gpus[p, 250], seconds[p, 250]) for p in THREE]
    assert totals.seconds_side_by_side_at_least == pytest.approx(
        max(sum(g * s for g, s in longest) / 8, *(s for _, s in longest)))


def test_table_shows_each_row_and_the_totals():
    plan = plan_sweep(THREE, LENGTHS, n_prompts=16, machine=H100_X8)
    lines = plan.table().splitlines()
    assert lines[0] == "| pair | tokens | strategy | GPUs | peak GiB | minutes | $ |"
    for row, line in zip(plan.rows, lines[2:8], strict=True):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells == [row.pair, str(row.tokens), row.strategy, str(row.gpus), f"{row.peak_gib_per_gpu:.2f}",
                         f"{row.est_seconds / 60:.1f}", f"${row.est_cost_usd:.2f}"]
    totals = plan.totals()
    assert lines[-1].startswith("6 runs on 8x H100 SXM 80GB")
    assert f"{totals.seconds / 60:.1f} min, ${totals.cost_usd:.2f}" in lines[-1]
    assert f"{totals.seconds_with_prefixes / 60:.1f} min, ${totals.cost_usd_with_prefixes:.2f}" in lines[-1]


def test_to_dict_is_json_with_rows_and_totals():
    plan = plan_sweep(THREE[:1], LENGTHS, n_prompts=16, machine=H100_X8)
    document = json.loads(json.dumps(plan.to_dict()))
    assert document["schema"] == "lens_compare.sweep_plan/1"
    assert document["machine"]["count"] == 8 and document["n_prompts"] == 16
    assert document["rows"] == [row.to_dict() for row in plan.rows]
    assert document["totals"]["seconds"] == pytest.approx(sum(row.est_seconds for row in plan.rows))


def test_cpu_has_no_price():
    plan = plan_sweep(["qwen0.5b"], LENGTHS, n_prompts=2, machine=CPU)
    assert all(row.fits and row.est_cost_usd is None for row in plan.rows)
    totals = plan.totals()
    assert totals.cost_usd is None and totals.cost_usd_with_prefixes is None
    assert totals.seconds == pytest.approx(sum(row.est_seconds for row in plan.rows))
    assert "no price" in plan.table().splitlines()[-1]


def test_a_pair_that_fits_nowhere_is_a_row_with_the_reason():
    t4 = catalog_machine("t4", 1, None)
    plan = plan_sweep(["deepseek-v3", "qwen0.5b"], LENGTHS, n_prompts=16, machine=t4)
    refused = [row for row in plan.rows if not row.fits]
    assert [(row.pair, row.tokens) for row in refused] == [("deepseek-v3", 10), ("deepseek-v3", 250)]
    direct = plan_pair("deepseek-v3", tokens=250, batch=16, machine=t4)
    assert direct.strategy is None
    reason = refused[1].reason
    assert reason.startswith("nothing fits on 1x T4") and "\n" not in reason
    for name, result in direct.strategies.items():
        assert f"{name}: {result.reason}" in reason
    assert refused[1] == PlannedRun("deepseek-v3", 250, None, reason=reason)
    totals = plan.totals()
    assert (totals.runs, totals.runs_fit, totals.runs_refused) == (4, 2, 2)
    assert totals.seconds == pytest.approx(sum(row.est_seconds for row in plan.rows if row.fits))
    assert "| deepseek-v3 | 10 | refused: nothing fits on 1x T4" in plan.table()


def test_a_requested_strategy_that_does_not_fit_names_only_itself():
    plan = plan_sweep(["llama405b"], [10], n_prompts=1, machine=catalog_machine("t4", 1, None), strategy="nf4")
    (row,) = plan.rows
    direct = plan_pair("llama405b", tokens=10, batch=1, machine=catalog_machine("t4", 1, None), strategy="nf4")
    assert row.reason == f"nothing fits on 1x T4 (15.00 GiB each): nf4: {direct.strategies['nf4'].reason}"


def test_a_pair_the_planner_cannot_model_is_a_row_and_the_sweep_goes_on(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model_type": "not_a_family", "hidden_size": 64, "num_hidden_layers": 2}))
    extra = _extra(odd={"base": str(config), "sft": str(config)})
    plan = plan_sweep(["odd", "qwen0.5b"], [10], n_prompts=1, machine=H100_X8, extra=extra)
    odd, qwen = plan.rows
    assert not odd.fits and "'not_a_family'" in odd.reason and "\n" not in odd.reason
    assert qwen.fits and plan.totals().runs_refused == 1


def test_a_pairs_file_pair_plans_as_the_registered_pair_with_its_facts():
    extra = _extra(mine={"base": "my/base", "sft": "my/sft", "config_key": "Qwen/Qwen2.5-7B"})
    mine = plan_sweep(["mine"], LENGTHS, n_prompts=16, machine=H100_X8, extra=extra)
    registered = plan_sweep(["qwen7b"], LENGTHS, n_prompts=16, machine=H100_X8)
    assert [row.to_dict() | {"pair": "qwen7b"} for row in mine.rows] == [row.to_dict() for row in registered.rows]


def test_a_pairs_file_pair_keeps_its_own_dtypes():
    extra = _extra(wide={"base": "my/base", "sft": "my/sft", "config_key": "Qwen/Qwen2.5-7B",
                         "base_dtype": "float32", "sft_dtype": "float32"})
    (wide,) = plan_sweep(["wide"], [10], n_prompts=1, machine=H100_X8, extra=extra).rows
    (narrow,) = plan_sweep(["qwen7b"], [10], n_prompts=1, machine=H100_X8).rows
    # float32 weights are twice bfloat16's, and weights are most of the peak.
    assert 1.8 * narrow.peak_gib_per_gpu < wide.peak_gib_per_gpu < 2.2 * narrow.peak_gib_per_gpu


def test_dtype_and_strategy_reach_the_planner():
    (row,) = plan_sweep(["qwen7b"], [250], n_prompts=4, machine=H100_X8, dtype="float32", strategy="sequential").rows
    direct = plan_pair("qwen7b", tokens=250, batch=4, machine=H100_X8.with_count(1), dtype="float32",
                       strategy="sequential")
    assert row.strategy == "sequential" and row.gpus == 1 and row.peak_gib_per_gpu == direct.chosen.peak_gib_per_gpu
    (auto,) = plan_sweep(["qwen7b"], [250], n_prompts=4, machine=H100_X8, strategy="auto").rows
    assert auto.strategy == plan_pair("qwen7b", tokens=250, batch=4, machine=H100_X8).strategy


@pytest.mark.parametrize(("arguments", "error", "message"), [
    ({"lengths": [0, 10]}, ConfigError, r"token lengths \[0, 10\] are impossible"),
    ({"lengths": []}, ConfigError, "token lengths"),
    ({"n_prompts": 0}, ConfigError, "0 prompts per run is impossible"),
    ({"strategy": "resdent"}, ConfigError, "unknown strategy 'resdent'"),
    ({"dtype": "float8"}, ConfigError, "unknown precision 'float8'"),
    ({"dtype": "nf4"}, ConfigError, "use --strategy nf4"),
    ({"pairs": ["qwen7b", "qwen7bb"]}, PairError, "Did you mean 'qwen7b'"),
])
def test_bad_input_is_refused_before_any_run_is_planned(arguments, error, message):
    given = {"pairs": ["qwen7b"], "lengths": [10], "n_prompts": 1, "machine": H100_X8, **arguments}
    with pytest.raises(error, match=message):
        plan_sweep(given.pop("pairs"), given.pop("lengths"), **given)


def test_dry_run_needs_neither_torch_nor_pandas():
    script = (
        "import sys; sys.modules['torch'] = None; sys.modules['pandas'] = None\n"
        "from lens_compare.hardware.machine import catalog_machine\n"
        "from lens_compare.sweeps.dry_run import plan_sweep\n"
        "from lens_compare.sweeps.pairs import expand_pairs\n"
        "plan = plan_sweep(expand_pairs('qwen7b,deepseek-v3'), [10, 250], n_prompts=16,\n"
        "                  machine=catalog_machine('h100', 8, None))\n"
        "print(plan.table())\n"
        "assert 'torch' not in [m for m, v in sys.modules.items() if v is not None], 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| deepseek-v3 | 250 | stream |" in done.stdout


def test_a_dry_run_on_a_ray_cluster_plans_for_its_largest_node():
    from lens_compare.sweeps.ray_executor import cluster_machine

    def node(alive=True, **resources):
        return {"Alive": alive, "NodeManagerAddress": "10.0.0.1", "Resources": resources}

    gib = 2**30
    nodes = [node(CPU=16, memory=64 * gib), node(GPU=8, CPU=96, memory=900 * gib, **{"accelerator_type:H100": 1}),
             node(GPU=8, CPU=96, memory=900 * gib, **{"accelerator_type:H100": 1}),
             node(False, GPU=16, **{"accelerator_type:H100": 1}),
             node(GPU=1, memory=32 * gib, **{"accelerator_type:A10G": 1})]
    machine, like = cluster_machine(nodes)
    assert (machine.kind, machine.count, machine.gpu.name, round(machine.host_ram_gib), like) == (
        "cuda", 8, "H100 SXM 80GB", 900, 2)
    cpu, like = cluster_machine(nodes[:1])
    assert (cpu.kind, cpu.count, cpu.device_gib, like) == ("cpu", 1, 64.0, 1)
    with pytest.raises(ConfigError, match="does not say which"):
        cluster_machine([node(GPU=2)])
