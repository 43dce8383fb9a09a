"""The one order in which the engine's callbacks run.

fastai sorts a Learner's callbacks by their `order` attribute, lowest first, at every event.
Every callback of the study takes its place from `ORDER`, so one step reads top to bottom here;
the two places fastai fixes itself (TrainEvalCallback, MixedPrecision) are checked against
fastai's own values by the tests.
"""

ORDER = {
    "train_eval": -10,  # fastai's TrainEvalCallback: counters and train/eval mode
    "resume": -5,  # a resumed epoch skips the batches it already trained
    "schedule": 1,  # the step's learning rate and weight decay
    "inputs": 5,  # the batch onto the device, then its augmentation (in fp32)
    "mixup": 6,  # fine-tuning's Mixup / CutMix of the augmented batch
    "mixed_precision": 10,  # fastai's MixedPrecision enters autocast
    "ddp": 11,  # DistributedDataParallel around the model, after autocast (as fastai's)
    "compile": 12,  # torch.compile of the wrapped model
    "nan_guard": 20,  # a non-finite loss stops the run before the optimizer applies it
    "momentum_queue": 60,  # MoCo: the key encoder's moving average and the queue, after a step
    "metrics": 70,  # per-epoch metrics (validation AUC, kNN AUC)
    "recorder": 80,  # the epoch's row of history, checkpoints, best weights
    "progress": 85,  # the display, once the row is written
}
