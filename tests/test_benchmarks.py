"""The benchmark scripts run (CPU smoke: interpret-mode kernels, tiny shapes) and check correctness first."""

import re

import pytest

from benchmarks import kernels
from benchmarks import train_loop


def test_kernels_benchmark_smoke_checks_every_kernel_against_its_baseline():
  report = kernels.run(kernels._parse_args(["--smoke", "--ts", "64", "--no_backward"]))
  assert "unavailable" not in report, report
  assert "INTERPRET mode" in report
  for op in kernels.OPS:
    assert f"## {op}" in report
  errors = [float(x) for x in re.findall(r"\| (\d\.\de[+-]\d\d) \|$", report, flags=re.M)]
  assert len(errors) == 5, report  # causal, cog, key_bias, gla, landmark: each checked before timing
  assert max(errors) < 1e-4, report


def test_train_loop_benchmark_reports_the_loop_s_step_time(repo_root):
  report = train_loop.run(train_loop._parse_args([f"--config={repo_root}/configs/tiny.py", "--steps=8",
                                                  "--log_every=2", "--runs=1"]))
  rows = re.findall(r"^\| (\d) \| ([\d.]+) \| ([\d,]+) \| (\d+) \|", report, flags=re.M)
  assert [r[0] for r in rows] == ["1"] and int(rows[0][3]) == 3, report  # 4 log windows, the first dropped
  assert all(float(r[1]) > 0 for r in rows) and "median over runs:" in report


def test_train_step_benchmark_reports_the_split_rates_and_top_ops(repo_root, capsys):
  from benchmarks import train_step
  assert train_step.main(["train_step", f"--config={repo_root}/configs/tiny.py", "--repeats=1", "--warmup=1",
                          "--profile_steps=1", "--top_ops=3"]) == 0
  report = capsys.readouterr().out
  assert report.startswith("# Train step: configs/tiny.py\n"), report[:200]
  for row in ("| train step (compiled) |", "| forward + backward |", "| model FLOP/s",
              "| matmul rate at [128, 32] x [32, 64] and back, f32 |", "| model FLOP/s / f32 matmul rate |"):
    assert row in report, report
  assert len(re.findall(r"^\| \S+ \| [\d.]+ \| [\d.]+% \|$", report, flags=re.M)) == 6, report  # 3 + 3 kinds


def test_mrt5_benchmark_reports_byt5_and_four_deletion_rates(capsys):
  from benchmarks import mrt5
  tiny = ["--config.model.num_layers=2", "--config.model.num_decoder_layers=1", "--config.model.d_model=32",
          "--config.model.mlp_dim=64", "--config.model.num_heads=2", "--config.model.head_dim=16",
          "--config.model.byt5.delete_gate.layer=1", "--config.train.seq_len=32"]
  assert mrt5.main(["mrt5", *tiny, "--batch=2", "--warmup=1", "--repeats=1", "--rounds=1"]) == 0
  report = capsys.readouterr().out
  rows = re.findall(r"^\| (ByT5|MrT5 \d+% deleted) \| (\d+) / (\d+) \| [\d.]+ \|", report, flags=re.M)
  assert [r[0] for r in rows] == ["ByT5"] + [f"MrT5 {p}% deleted" for p in (0, 30, 50, 70)], report
  assert [int(r[1]) for r in rows] == [32, 32, 22, 16, 10] and [int(r[2]) for r in rows] == [32, 32, 24, 16, 16]
  assert "| 32.3% |" in report and "configs/mrt5.py" in report  # the paper's 50% beside the measurement


@pytest.mark.slow
def test_hierarchical_benchmark_reports_each_config_beside_the_flat_baseline(capsys):
  from benchmarks import hierarchical
  tiny = ["--config.train.batch_size=2", "--config.train.seq_len=32", "--config.model.d_model=32",
          "--config.model.num_heads=2", "--config.train.compute_dtype=float32",
          "--config.model.hierarchical.patch_size=2"]  # hierarchical-only: the flat baseline skips it
  assert hierarchical.main(["hierarchical", "--configs=hourglass", *tiny, "--warmup=0", "--repeats=1",
                            "--rounds=1", "--compression_batches=1"]) == 0
  report = capsys.readouterr().out
  rows = re.findall(r"^\| (hourglass|flat \(\d+ layers\)) \| [\d,]+ \| [\d.]+ \| [\d,]+ \| [\d.]+M \| [\d.]+M \| "
                    r"[\d.]+ \| (.+) \| ([\d.]+) \| ([\d.]+) \|$", report, flags=re.M)
  # 1 + 4 + 1 layers of d 32 and Hourglass's attention resampling (about two more blocks' params)
  assert [r[0] for r in rows] == ["hourglass", "flat (8 layers)"], report
  assert re.fullmatch(r"\d\.\d\d \(17 slots\) \| \d+\.\d%", rows[0][1]), report  # 32 / 2 + 1 slots
  assert rows[1][1:] == ("— | —", "1.00", "1.00"), report


@pytest.mark.slow
def test_generation_benchmark_times_incremental_against_recompute_with_the_same_bytes(capsys):
  from benchmarks import generation
  tiny = ["--config.train.seq_len=32", "--config.model.d_model=32", "--config.model.num_heads=2",
          "--config.train.compute_dtype=float32"]
  assert generation.main(["generation", "--configs=megabyte", *tiny, "--config.model.hierarchical.global_d_model=128",
                          "--config.model.hierarchical.global_layers=1", "--flat_layers=1", "--prompt=8",
                          "--max_new=6", "--warmup=0", "--repeats=1"]) == 0
  report = capsys.readouterr().out
  rows = re.findall(r"^\| (megabyte|flat \(\d+ layers\)) \| [\d,]+ \| [\d,]+ \| [\d.]+x \| (yes|no) \|", report,
                    flags=re.M)
  assert [r[0] for r in rows][:1] == ["megabyte"] and len(rows) == 2, report
  assert all(r[1] == "yes" for r in rows), report  # greedy: both paths emit the same bytes


@pytest.mark.slow
def test_experiment_runner_trains_skips_finished_runs_and_writes_the_table(tmp_path, capsys):
  from benchmarks import experiments
  args = ["hierarchical", f"--out={tmp_path}", "--runs=flat", "--steps=2"]
  assert experiments.main([*args, "--list"]) == 0
  assert "--config.train.steps=2" in capsys.readouterr().out
  assert experiments.main(args) == 0
  first = capsys.readouterr().out
  assert "training flat seed 0" in first and "| flat | 1 |" in first
  assert experiments.main(args) == 0  # a second call retrains nothing
  assert "finished, skipped" in capsys.readouterr().out
  for name in ("results.json", "results.csv", "results.md"):
    assert (tmp_path / "hierarchical" / name).exists()


@pytest.mark.parametrize("name", ["hierarchical", "lm-variants", "lm-variants-wall", "mqar-recall",
                                  "length-generalization", "mrt5-deletion"])
def test_every_experiment_run_is_a_config_that_resolves(name):
  """Each run's config file (with its argument) and overrides load and resolve, as train.py would."""
  from benchmarks import experiments
  from training import cli
  from training import runtime
  experiment = experiments.EXPERIMENTS[name]
  for run in experiment.runs:
    overrides = experiments.settings(experiment, run, None)
    config, _ = cli.parse(["train.py", f"--config={run.config}", *(f"--config.{o}" for o in overrides)])
    resolved = runtime.resolve_config(config)
    runtime.family(resolved)  # the family accepts the model options
    # The committed rows' dtype on every machine ("auto" would pick f32 on a CPU without AMX).
    assert resolved.train.compute_dtype == ("float32" if name == "mqar-recall" else "bfloat16"), run.name
    assert not run.init_from or run.init_from in [r.name for r in experiment.runs]


def test_mrt5_deletion_plan_starts_every_continuation_from_the_one_base_run(tmp_path):
  from benchmarks import experiments
  experiment = experiments.EXPERIMENTS["mrt5-deletion"]
  plan = experiments._plan(experiment, list(experiment.runs), None, str(tmp_path), None)
  base = [p for p in plan if p["base"]]
  assert [(p["run"].name, p["seed"], p["steps"]) for p in base] == [("byt5_base", 0, 1500)]
  rest = [p for p in plan if not p["base"]]
  assert len(rest) == 8 and {p["seed"] for p in rest} == {0, 1}
  assert all(p["init_from"] == base[0]["workdir"] and p["steps"] == 300 for p in rest)
  mrt5 = [p for p in rest if p["run"].name.startswith("mrt5")]
  cmd = experiments.command(mrt5[0]["run"], 1, mrt5[0]["workdir"], mrt5[0]["overrides"], mrt5[0]["init_from"])
  assert f"--config.train.init_from={base[0]['workdir']}" in cmd and "--config.optimizer.lr=1e-4" in cmd
  assert "--config.model.byt5.delete_gate.target=0.3" in cmd


@pytest.mark.slow
def test_task_experiment_evaluates_each_run_and_tabulates_accuracy(tmp_path, capsys):
  from benchmarks import experiments
  args = ["mqar-recall", f"--out={tmp_path}", "--runs=softmax,landmark", "--steps=2", "--seeds=0"]
  assert experiments.main(args) == 0
  out = capsys.readouterr().out
  assert "evaluate.py --tasks=mqar" in out and "| num_pairs 4 | num_pairs 8 |" in out
  assert re.search(r"^\| landmark \| 1 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", out, flags=re.M), out
  assert (tmp_path / "mqar-recall" / "runs" / "softmax_s0" / "eval" / "mqar_step2.json").exists()
  assert experiments.main(args) == 0  # neither trained nor evaluated again
  again = capsys.readouterr().out
  assert "evaluate.py --tasks" not in again and again.count("finished, skipped") == 2
  assert "accuracy_num_pairs_16" in (tmp_path / "mqar-recall" / "results.csv").read_text()


def test_wall_budget_gives_each_run_the_steps_its_own_throughput_fills(tmp_path):
  """lm-variants-wall: steps = seconds x the highest per-seed median logged bytes/s of the same run in
  lm-variants / bytes per step, the same for every seed; a missing source run is one error naming it."""
  from benchmarks import experiments
  experiment = experiments.EXPERIMENTS["lm-variants-wall"]
  runs = [r for r in experiment.runs if r.name in ("softmax", "spacebyte")]
  for name, seed, rates in (("softmax", 0, [9000.0, 14000.0, 15000.0]), ("softmax", 1, [8000.0, 12000.0]),
                            ("spacebyte", 0, [5000.0, 7000.0, 8000.0]), ("spacebyte", 1, [7500.0])):
    workdir = tmp_path / "lm-variants" / "runs" / f"{name}_s{seed}"
    workdir.mkdir(parents=True)
    (workdir / "config.json").write_text('{"train": {"batch_size": 16, "seq_len": 256}}')
    (workdir / "metrics.jsonl").write_text("".join(f'{{"step": {i}, "tokens_per_s": {r}}}\n'
                                                   for i, r in enumerate(rates)))
  plan = experiments._plan(experiment, runs, None, str(tmp_path / "lm-variants-wall"), None)
  assert [(p["run"].name, p["seed"], p["steps"]) for p in plan] == [
      ("softmax", 0, round(180 * 14000 / 4096)), ("softmax", 1, round(180 * 14000 / 4096)),
      ("spacebyte", 0, round(180 * 7500 / 4096)), ("spacebyte", 1, round(180 * 7500 / 4096))]
  assert f"checkpoint.every={plan[0]['steps']}" in plan[0]["overrides"]
  (tmp_path / "lm-variants" / "runs" / "spacebyte_s1" / "metrics.jsonl").unlink()
  with pytest.raises(RuntimeError, match="needs the finished run .*spacebyte_s1"):
    experiments._plan(experiment, runs, None, str(tmp_path / "lm-variants-wall"), None)


def test_reused_rows_are_tabulated_not_retrained_and_fix_a_wall_budget_s_steps(tmp_path, capsys):
  """--reuse: an earlier results.json row with the planned config, overrides and steps stands for that run
  and seed; under a wall-time budget its steps are every seed's when the source runs are gone."""
  import json
  from benchmarks import experiments
  row = {"run": "flat", "seed": 0, "config": "configs/base.py", "overrides": "", "steps": 2, "bytes_seen": 8192,
         "valid_bpb": 3.5, "gzip_bpb": 1.85, "xz_bpb": 1.6, "train_flops_per_byte": 1e7, "train_flops": 8e10,
         "params": 1000, "wall_s": 9.0}
  earlier = tmp_path / "earlier.json"
  earlier.write_text(json.dumps({"experiment": "hierarchical", "rows": [row, {**row, "steps": 3}]}))
  args = ["hierarchical", f"--out={tmp_path / 'out'}", "--runs=flat", "--steps=2", f"--reuse={earlier}"]
  assert experiments.main(args) == 0
  out = capsys.readouterr().out
  assert "flat seed 0: reused" in out and "training flat" not in out and "| flat | 1 | 3.5000" in out
  assert not (tmp_path / "out" / "hierarchical" / "runs").exists()
  assert json.loads((tmp_path / "out" / "hierarchical" / "results.json").read_text())["rows"][0]["valid_bpb"] == 3.5
  with pytest.raises(RuntimeError, match="holds experiment 'hierarchical', not 'mqar-recall'"):
    experiments.main(["mqar-recall", f"--out={tmp_path / 'out'}", f"--reuse={earlier}"])

  wall = experiments.EXPERIMENTS["lm-variants-wall"]
  spacebyte = [r for r in wall.runs if r.name == "spacebyte"]
  reused = [{**row, "run": "spacebyte", "config": "configs/spacebyte.py", "steps": 346}]
  plan = experiments._plan(wall, spacebyte, None, str(tmp_path / "lm-variants-wall"), None, reused)
  assert [(p["seed"], p["steps"]) for p in plan] == [(0, 346), (1, 346)]
  assert experiments.reused_row(reused, plan[0]) is reused[0] and experiments.reused_row(reused, plan[1]) is None


def test_probe_task_is_evaluated_when_missing_and_its_accuracies_are_columns(tmp_path):
  """length-generalization's copy probe: a run with only the passkey result still needs copy; once both exist,
  the row holds copy/<probe> and the table a column per listed probe ("-" for a reused row without it)."""
  import json
  from benchmarks import experiment_report, experiments
  experiment = experiments.EXPERIMENTS["length-generalization"]
  run = experiment.runs[0]
  workdir = tmp_path / "run"
  (workdir / "eval").mkdir(parents=True)
  (workdir / "config.json").write_text('{"train": {"batch_size": 8, "seq_len": 512, "compute_dtype": "bfloat16"}}')
  (workdir / "metrics.jsonl").write_text('{"step": 3, "eval/bpb": 1.75}\n')
  passkey = [{"length_x_train": x, "accuracy": 0.5 / x} for x in (1, 2, 4, 8, 16)]
  (workdir / "eval" / "passkey_step3.json").write_text(json.dumps({"entries": {"a": {"rows": passkey}}}))
  assert experiments.missing_tasks(experiment, str(workdir), 3) == ["copy"]
  probes = [{"probe": p, "accuracy": a} for p, a in (("passkey_repeat", 1.0), ("passkey_answer", 0.25),
                                                     ("repeat_digits", 0.125), ("repeat_letters", 0.0))]
  (workdir / "eval" / "copy_step3.json").write_text(json.dumps({"entries": {"a": {"rows": probes}}}))
  assert experiments.missing_tasks(experiment, str(workdir), 3) == []
  row = experiments.collect(run, 0, str(workdir), 3, experiment)
  assert row["copy/passkey_answer"] == 0.25 and row["accuracy"]["16"] == 0.5 / 16
  older = {k: v for k, v in row.items() if not k.startswith("copy/")}
  table = experiment_report.markdown("length-generalization", experiment,
                                     experiment_report.summarize([row, {**older, "run": "older"}], experiment))
  assert "| copy: key repeat | copy: answer | copy: random digits |" in table
  assert re.search(r"^\| softmax \| 1 \| 0\.500 .* \| 1\.000 \| 0\.250 \| 0\.125 \|$", table, flags=re.M), table
  assert re.search(r"^\| older \| 1 \| .* \| - \| - \| - \|$", table, flags=re.M), table


def test_probe_task_metrics_are_columns(tmp_path):
  """mrt5-deletion's encoder_ablation probe returns one metrics dict: its numbers become
  encoder_ablation/<name> (the split's name, a string, does not)."""
  import json
  from benchmarks import experiment_report, experiments
  experiment = experiments.EXPERIMENTS["mrt5-deletion-short-spans"]
  workdir = tmp_path / "run"
  (workdir / "eval").mkdir(parents=True)
  (workdir / "config.json").write_text('{"train": {"batch_size": 8, "seq_len": 256, "compute_dtype": "bfloat16"}}')
  (workdir / "metrics.jsonl").write_text('{"step": 3, "eval/bpb": 1.5, "eval/deletion_rate": 0.5}\n')
  assert experiments.missing_tasks(experiment, str(workdir), 3) == ["encoder_ablation"]
  metrics = {"split": "valid", "bpb": 1.5, "blank_inputs_bpb": 2.25, "encoder_bits": 0.75, "bytes": 10}
  (workdir / "eval" / "encoder_ablation_step3.json").write_text(
      json.dumps({"entries": {"a": {"metrics": metrics}}}))
  row = experiments.collect(experiment.runs[2], 0, str(workdir), 3, experiment)
  assert row["encoder_ablation/encoder_bits"] == 0.75 and "encoder_ablation/split" not in row
  table = experiment_report.markdown("mrt5-deletion-short-spans", experiment,
                                     experiment_report.summarize([row], experiment))
  assert "bits lost with blank inputs" in table and "| 0.750 |" in table, table


def test_table_only_tabulates_reused_rows_and_trains_nothing(tmp_path, capsys):
  import json
  from benchmarks import experiments
  row = {"run": "flat", "seed": 0, "config": "configs/base.py", "overrides": "", "steps": 2, "bytes_seen": 8192,
         "valid_bpb": 3.5, "gzip_bpb": 1.85, "xz_bpb": 1.6, "train_flops_per_byte": 1e7, "train_flops": 8e10}
  earlier = tmp_path / "earlier.json"
  earlier.write_text(json.dumps({"experiment": "hierarchical", "rows": [row]}))
  args = ["hierarchical", f"--out={tmp_path / 'out'}", "--runs=flat", "--steps=2", "--seeds=0,1", "--table_only"]
  assert experiments.main(args) == 1  # nothing finished or reused: no table
  assert "no run is finished or reused" in capsys.readouterr().err
  assert experiments.main([*args, f"--reuse={earlier}"]) == 0
  out = capsys.readouterr().out
  assert "flat seed 1: not trained, left out" in out and "| flat | 1 | 3.5000" in out
  assert not (tmp_path / "out" / "hierarchical" / "runs").exists()
