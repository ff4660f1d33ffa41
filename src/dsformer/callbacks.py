"""STF in ``transformers.Trainer``: one callback added to an existing fine-tuning script.

Wrap the model before building the Trainer, add the callback, finalize after training::

    stf = dsformer.STF.wrap(model, dsformer.DenseSparseConfig(ratio=2.0))
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev,
                      callbacks=[dsformer.STFCallback(stf)])
    trainer.train()
    report = stf.finalize(iters=0)   # the compact model, exactly as it was evaluated
    dsformer.save(model, "outputs/compact", tokenizer=tokenizer, report=report)

After every optimizer step the callback calls :meth:`STF.step`; at an epoch end or before an
evaluation it re-projects first, so evaluation sees the latest latents' projection. The
projections' factors are buffers of the model, so Trainer's checkpoints, ``resume_from_checkpoint``
and ``load_best_model_at_end`` carry them with the weights. ``Schedule.polish`` (the compact
factors training for the last steps) needs a new optimizer mid-run: ``dsformer finetune`` does
it with two Trainer runs; this callback trains straight-through to the end.
"""

from __future__ import annotations

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from dsformer.stf import STF


class STFCallback(TrainerCallback):
    """Drives an :class:`~dsformer.stf.STF` from ``transformers.Trainer`` (single process, DDP or accelerate)."""

    def __init__(self, stf: STF) -> None:
        self.stf = stf

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.stf.set_step(state.global_step)  # a resumed run goes on where its checkpoint was

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.stf.layers:  # finalize() may have ended STF
            self.stf.step(state.global_step, refresh=control.should_evaluate or ends_epoch(state))


def ends_epoch(state: TrainerState) -> bool:
    """Whether the step just taken ends an epoch (or the training)."""
    return state.global_step >= state.max_steps or float(state.epoch or 0).is_integer()
