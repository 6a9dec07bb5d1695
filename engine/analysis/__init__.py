"""Analysis: the policy-reward interplay metrics (docs/method.md section 4), measured live in LoRA parameter space;
their offline report from a run's checkpoints is the `zopro interplay` command (engine.cli.interplay_report)."""
