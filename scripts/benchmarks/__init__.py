"""The benchmark suite behind `scripts/bench.py`, one module per topic.

- timing: wall-clock helpers (`timed`, `paired`) and peak-memory measurement (CUDA allocator, or polled resident memory
  of a fresh process on the CPU);
- worlds: the models and prompts the benchmarks run on (paths of the committed worlds, the tiny SD model);
- report: the markdown table and the JSON file of the rows;
- sampling: our samplers with per-step log-probs against diffusers' pipelines and a bare masked-diffusion loop;
- updates: the cost of a DDPO and a PRDP update against plain forward/backward passes;
- memory: DRaFT-K peak memory (and time) with and without checkpointing, one fresh process per setting;
- attention: trainer.attention=sdpa vs naive;
- components: method parts against their plain versions (Parrot's guidance and Pareto selection, Ctrl-U's update,
  DRAGON's embedding cache, the GFlowNet key–value cache);
- pipelines/: every pipeline's training unit against the same algorithm written as a plain loop, with an equality check;
- scaling: cost against denoising steps, batch size, truncation K and sequence length, plotted;
- compiled: torch.compile against eager forward passes.

Every benchmark takes the parsed command-line arguments and returns rows (dicts) in one format: benchmark, baseline,
baseline_s, ours_s, ratio (ours / baseline), plus optional extra columns.
"""
