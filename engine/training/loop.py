"""The training loop of one run, docs/method.md section 1, top to bottom: SFT, the reward model, then for each
iteration policy optimisation, judge and refine, keep close, evaluate. `train` is the loop and names each
next stage itself; `start` and `resume` are its two ways in, where the bookkeeping (`run.book`) opens a new
run directory or reopens one from its newest readable checkpoint. Every stage continues from the step its
checkpoint holds, and `book.begin(stage)` is false for the stages a resumed run has already done."""

from __future__ import annotations

from engine.errors import StopRun
from engine.rundir.checkpoints import iteration_checkpoint_name
from engine.rundir.wording import short_iteration
from engine.training.evaluation import evaluate, watch
from engine.training.run import Run
from engine.training.shared_stages import StagesSource, adopt_stages
from engine.training.stages import (
    iteration_metrics,
    optimise_policy,
    refine_reward_model,
    supervised_fine_tuning,
    train_reward_model,
)


def train(run: Run) -> None:
    book = run.book
    with book.running():  # signals stop it cleanly; the end (finished or stopped) is recorded
        # 1. supervised fine-tuning on (prompt, chosen): the reference policy for KL
        if book.begin("sft"):
            supervised_fine_tuning(run)
            run.models.copy_adapter("sft", "policy")  # the policy starts as a copy of the SFT model
            book.end_stage(then="reward", checkpoint="sft")
        # 2. the Bradley-Terry reward model; then the SFT policy's held-out evaluation, the baseline
        if book.begin("reward"):
            train_reward_model(run)
            evaluate(run, label="sft")
            run.remember_adapters(-1)  # where iteration 0 starts (ZOPrO's adapter history)
            book.end_stage(then="policy", checkpoint="reward")
        # 3. iterations i = 0 .. N-1, each on its own chunk of the training prompts
        while not book.done:
            i = run.state.iteration
            # a. policy optimisation with the chosen method (rloo, ppo, online_dpo, mezo, zopro)
            if book.begin("policy"):
                optimise_policy(run)
                book.end_stage(then="refine")
            # b-f. least-confident rollouts, a second answer, the judge, reward refinement, keep close
            if book.begin("refine"):
                refine_reward_model(run)
                book.end_stage(then="eval")
            # held-out evaluation; the watchdog warns, and policy.max_kl stops the run or rolls it back
            if book.begin("eval"):
                iteration_metrics(run)
                runaway = watch(run, evaluate(run, label=short_iteration(i)))
                if runaway and run.recipe.policy.max_kl_action == "rollback":
                    run.roll_back(i, runaway)  # the previous iteration's checkpoint ends the run
                    break
                run.remember_adapters(i)
                run.state.next_iteration()
                last = run.state.iteration >= run.recipe.train.iterations
                checkpoint = iteration_checkpoint_name(i)
                book.end_stage(then="done" if last else "policy", checkpoint=checkpoint)
                if runaway:
                    raise StopRun(f"{runaway}; the run stopped after checkpoint {checkpoint}", failed=True)


def start(run: Run, stages_from: StagesSource | None = None) -> None:
    """A new run: the bookkeeping writes the resolved recipe, meta and the first status; then train. With
    `stages_from`, the SFT and reward stages are another run's (engine.training.shared_stages): they are
    copied in, and the run goes on from their checkpoint as a resumed run does."""
    run.book.open_new_run(
        base=run.models.base_path,
        total_steps=run.total_steps,
        data_report=run.data_report,
        stages_from=stages_from.path if stages_from is not None else None,
    )
    if stages_from is not None:
        adopt_stages(run, stages_from)
        run.book.reopen(run.load_checkpoint, adopted_from=stages_from.path)
    train(run)


def resume(run: Run) -> None:
    """Continue from the newest intact checkpoint: same data order, same sampling, same directions. One
    that cannot be read is skipped (and named); with none left, RunDirError and nothing changes."""
    run.book.reopen(run.load_checkpoint)
    train(run)
