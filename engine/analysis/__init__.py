"""Analysis: the policy-reward interplay metrics (method.md section 4) and their offline report."""
