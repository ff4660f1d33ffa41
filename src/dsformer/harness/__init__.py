"""The experiment harness: tasks and metrics, fine-tuning on ``transformers.Trainer``, the method registry,
sweeps, result tables and plots, speed benchmarks. It depends on the core library, never the reverse.

- :mod:`~dsformer.harness.tasks`, :mod:`~dsformer.harness.metrics`, :mod:`~dsformer.harness.data`: task data
  and GLUE's official metrics;
- :mod:`~dsformer.harness.models`: where models come from (the embedded MiniLM, a folder, a hub name);
- :mod:`~dsformer.harness.methods`: the registry of compression methods; :mod:`~dsformer.harness.prepare`
  applies one to a model;
- :mod:`~dsformer.harness.training`: fine-tuning; :mod:`~dsformer.harness.finetune`: one run end to end;
- :mod:`~dsformer.harness.sweep`, :mod:`~dsformer.harness.results`: grids of runs and their tables;
- :mod:`~dsformer.harness.bench`, :mod:`~dsformer.harness.runs`: speed, and what to do with saved runs.
"""
