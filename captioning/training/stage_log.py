"""The lines a training stage logs for the person watching it (rank 0; the flow's log, the terminal).

    stage xe starts: up to 6 epochs of 38 steps, a step 16 images x 5 captions on each of 2 processes;
        160 captions per step; lr decoder 2.00e-03 encoder 5.00e-04 = as set (160 captions per step);
        channels_last off, fused_adam off, compile off, cudnn_benchmark off, ddp_bucket_view off
    stage xe epoch 2: batch 300/1000, loss 2.8170, 120.4 images/s, epoch ETA 4 min 10 s   (long epochs)
    stage xe epoch 3/6: loss 2.8170 ce 2.7952; val CIDEr 0.4120 BLEU-4 0.2210 METEOR 0.2010
        ROUGE-L 0.4700 (best CIDEr 0.4120 at epoch 3); 41 s/epoch, stage ETA 2 min 03 s
    stage xe done in 4 min 12 s: 6 epochs, best val CIDEr 0.5120 at epoch 5; test BLEU-4 ... CIDEr 0.4980

Epochs are counted from 1 here (the trainer's state counts from 0). The ETA is the epochs left at this
process's mean epoch time plus one more evaluation for the test split; an early stop ends sooner.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from captioning.progress import format_duration

SHOWN_SCORES = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")  # after the monitored one
SHOWN_TRAIN = ("loss", "ce", "reward")  # the epoch's train/<key> means shown (reward: SCST)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def start_line(
    stage: str,
    first_epoch: int,
    epochs: int,
    steps: int,
    batch_size: int,
    world_size: int,
    *,
    captions_per_image: int,
    unit: str = "captions",
    rates: str,
    switches: str,
) -> str:
    """The stage's plan: epochs, steps, what a step sees (``unit``: captions, or SCST's samples), its
    learning rates (``LrPlan.describe``) and the GPU switches (``Speed.describe``)."""
    begins = "starts" if first_epoch <= 1 else f"resumes at epoch {first_epoch}"
    on = f"each of {world_size} processes" if world_size > 1 else "1 process"
    per_step = f"{batch_size} images x {captions_per_image} {unit} on {on}"
    return (
        f"stage {stage} {begins}: up to {_count(epochs, 'epoch')} of {_count(steps, 'step')}, "
        f"a step {per_step}; {rates}; {switches}"
    )


def batch_line(
    stage: str, epoch: int, batch: int, batches: int, loss: float, images_per_s: float, eta_s: float
) -> str:
    return (
        f"stage {stage} epoch {epoch}: batch {batch}/{batches}, loss {loss:.4f}, "
        f"{images_per_s:.1f} images/s, epoch ETA {format_duration(eta_s)}"
    )


def scores_text(scores: Mapping[str, float], first: str | None = None) -> str:
    """``CIDEr 0.4120 BLEU-4 0.2210 ...``: ``first`` (the monitored metric), then SHOWN_SCORES."""
    ordered = [first, *(k for k in SHOWN_SCORES if k != first)] if first else list(SHOWN_SCORES)
    return " ".join(f"{k} {scores[k]:.4f}" for k in ordered if k is not None and k in scores)


def epoch_line(
    stage: str,
    epoch: int,
    epochs: int,
    means: Mapping[str, float],
    scores: Mapping[str, float],
    *,
    monitor: str,
    best: tuple[float, int],
    epoch_s: float,
    eta_s: float,
    decayed: bool = False,
    stopped_after: int | None = None,
) -> str:
    """The one line per epoch: ``means`` are the epoch's ``train/*`` means, ``best`` (score, epoch),
    ``stopped_after``: the early-stopping patience when the stage stops after this epoch."""
    shown = " ".join(f"{k} {means[f'train/{k}']:.4f}" for k in SHOWN_TRAIN if f"train/{k}" in means)
    line = (
        f"stage {stage} epoch {epoch}/{epochs}: {shown or 'no batches'}; val {scores_text(scores, monitor)} "
        f"(best {monitor} {best[0]:.4f} at epoch {best[1]}); {format_duration(epoch_s)}/epoch, "
        f"stage ETA {format_duration(eta_s)}"
    )
    if decayed:
        line += "; learning rates decayed"
    if stopped_after is not None:
        line += f"; early stop: no gain in {stopped_after} epochs"
    return line


def stage_eta(epoch_seconds: Sequence[float], epochs_left: int, last_eval_s: float) -> float:
    """Seconds until the stage ends: ``epochs_left`` at the mean of ``epoch_seconds``, plus the test
    evaluation (estimated by the last validation's time)."""
    mean = sum(epoch_seconds) / len(epoch_seconds) if epoch_seconds else 0.0
    return mean * max(0, epochs_left) + last_eval_s


def done_line(
    stage: str,
    duration_s: float,
    epochs: int,
    monitor: str,
    best: tuple[float, int],
    test: Mapping[str, float],
) -> str:
    return (
        f"stage {stage} done in {format_duration(duration_s)}: {_count(epochs, 'epoch')}, best val {monitor} "
        f"{best[0]:.4f} at epoch {best[1]}; test {scores_text(test, monitor)}"
    )
