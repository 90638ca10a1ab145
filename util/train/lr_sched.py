"""Per-iteration learning rate: linear warmup, then constant or half-cycle cosine."""
import math

LR_SCHEDULES = ("constant", "cosine")


def lr_at(epoch, lr, warmup_epochs, total_epochs, schedule="constant", min_lr=0.0):
    """Learning rate at a fractional epoch (epoch + iteration / iterations_per_epoch)."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"--lr_schedule must be one of {LR_SCHEDULES}; got {schedule!r}")
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    if schedule == "constant":
        return lr
    span = max(total_epochs - warmup_epochs, 1e-12)
    progress = min((epoch - warmup_epochs) / span, 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr
