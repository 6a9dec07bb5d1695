"""Training: the loop of docs/method.md section 1 and what it is made of (models, rollout, objectives, the
policy-update methods, the zeroth-order step and its direction samplers, judges, telemetry)."""
