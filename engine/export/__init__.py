"""What a finished (or running) run leaves: the policy and reward model as folders others load, answers from
any checkpoint, and figures and a report of its results."""
