"""Training speed: steps/s and peak memory, inner model on masked tokens only vs on every token.

MAR.forward runs the inner model on the masked tokens only; the release ran it on all tokens
and masked the loss (bench/baseline.py: release_style_loss). Both are timed in this process
on the same weights and the same random masks (same seed); the losses agree (the JSON's
"losses_agree": relative difference and tolerance per precision). A step is forward + backward + AdamW
update on random latents (no data or weights needed). The JSON is written after the losses, the timing
and each peak-memory measurement, so a run killed later keeps what was measured.

Memory: the activations autograd saves for backward (exact, on the same mask for both paths);
and the peak: on CUDA torch.cuda.max_memory_allocated in this process, on CPU the peak resident
set (ru_maxrss) of a fresh child process per path, so one path's peak cannot hide the other's
(the CPU allocator's high-water mark is coarse; the saved-activation figure is the precise one).

Speed is also printed as images/s and MFU: each path's model FLOPs per step (util/flops.py, 3x a
counted forward) x steps/s / the GPU's dense peak for --precision (none on CPU or an unknown GPU).
--grad_checkpointing recomputes the outer blocks in backward: compare its time and peak memory.
On CUDA the peak is also taken at a quarter of the batch; peak memory is affine in the batch (weights,
gradients and AdamW state fixed, activations per image), so the two give the largest per-GPU batch
that fits a 40 GB and an 80 GB card (within 90% of 40 / 80 GiB: room for the CUDA context and the
allocator's fragmentation).

CPU configuration of issue 5:
    python -m bench.bench_train --width 128 --enc_dec_depth 2 --num_heads 4 --batch_size 4 --steps 3
ARINAR-B on a GPU:
    python -m bench.bench_train --device cuda --precision bf16 --batch_size 64 [--grad_checkpointing]
"""
import argparse
import gc
import logging
import multiprocessing
import resource

import torch

from bench.config import (add_model_args, add_runtime_args, build_model, machine_line, median,
                          parser, setup_runtime, synchronize, time_runs, write_json)
from bench.baseline import release_style_loss
from sampling import precision_autocast
from util import flops

log = logging.getLogger("bench.train")
PATHS = ("masked_only", "all_tokens")
CARDS_GIB = (40, 80)
HEADROOM = 0.9  # of a card's memory that the peak may take
LOSS_TOLERANCE = {"fp32": 1e-5, "bf16": 2e-2, "fp16": 5e-3}  # relative, of the two paths' losses


def parse_args(argv=None):
    p = parser(__doc__.splitlines()[0])
    add_model_args(p)
    add_runtime_args(p)
    g = p.add_argument_group("training")
    g.add_argument("--batch_size", type=int, default=8)
    g.add_argument("--steps", type=int, default=3, help="optimizer steps per timed run")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--no_memory", action="store_true", help="skip the peak-memory measurement")
    g.add_argument("--grad_checkpointing", action="store_true", help="recompute the outer blocks in backward")
    return p.parse_args(argv)


def make_step(args, device):
    """(loss_of(path), step(path), parameters): a path's loss, and one forward/backward/update."""
    model = build_model(args).to(device).train()
    model.grad_checkpointing = args.grad_checkpointing
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95))
    # as in main_mar.py: fp16 gradients underflow without loss scaling; bf16 and fp32 need none
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    tokens = model.config.tokens
    side = tokens.seq_h * tokens.patch_size
    gen = torch.Generator().manual_seed(args.seed)
    latents = torch.randn(args.batch_size, tokens.vae_embed_dim, side, side, generator=gen).to(device)
    labels = torch.randint(0, model.config.class_num, (args.batch_size,), generator=gen).to(device)

    def loss_of(path):
        with precision_autocast(device, args.precision):
            if path == "masked_only":
                return model(latents, labels)
            return release_style_loss(model, latents, labels)

    def step(path):
        loss = loss_of(path)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return loss_of, step, list(model.parameters())


def saved_activation_mib(model_params, loss_of, path):
    """MiB of tensors autograd keeps for the backward pass of one loss (parameters excluded).

    Exact and allocator-independent: each saved storage is counted once, by address (saved
    tensors stay alive until backward, so addresses cannot be reused meanwhile).
    """
    params = {p.untyped_storage().data_ptr() for p in model_params}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss_of(path)
    return sum(saved.values()) / 2 ** 20


def peak_memory_mb(args, path):
    """(peak MiB over `steps` training steps of one path, CPU resident MiB before the first step)."""
    device = setup_runtime(args)
    if device.type == "cuda":  # nothing of an earlier measurement may stay allocated
        gc.collect()
        torch.cuda.empty_cache()
    _, step, _ = make_step(args, device)
    if device.type == "cuda":
        step(path)  # optimizer state exists after the first step
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.steps):
            step(path)
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2 ** 20, None
    before = current_rss_mb()
    for _ in range(args.steps + 1):
        step(path)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, before  # Linux reports KiB


def largest_batch(peaks, card_gib, headroom=HEADROOM):
    """The largest batch whose peak fits headroom x card_gib GiB, from peaks {batch: MiB} at two batch
    sizes (the line through them: fixed MiB + MiB per image); 0 when even the fixed part does not fit."""
    (b0, m0), (b1, m1) = sorted(peaks.items())
    per_image = (m1 - m0) / (b1 - b0)
    fixed = m0 - per_image * b0
    budget = headroom * card_gib * 1024 - fixed
    if per_image <= 0:
        raise ValueError(f"peak memory does not grow with the batch ({peaks}); measure at larger batches")
    return max(0, int(budget // per_image))


def current_rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def peak_memory_in_child(args, path):
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(peak_memory_mb, (args, path))


def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    device = setup_runtime(args)
    log.info("machine: %s", machine_line(device))
    log.info("config: %s", {k: v for k, v in vars(args).items() if k != "json"})
    loss_of, step, params = make_step(args, device)
    results = {"machine_before": machine_line(device), "args": vars(args)}

    losses = {}
    for path in PATHS:
        torch.manual_seed(args.seed)  # same masks, label drops and dropout draws for both paths
        with torch.no_grad():
            losses[path] = loss_of(path).item()
    results["losses"] = losses
    results["losses_agree"] = losses_agree(losses, args.precision)
    log.info("losses on the same draws (should agree): %s; relative difference %.1e (tolerance %.0e): %s", losses,
             results["losses_agree"]["relative_difference"], results["losses_agree"]["tolerance"],
             "agree" if results["losses_agree"]["agree"] else "DIFFER")
    write_json(args.json, results)  # so far: a part killed later keeps what was measured
    for path in PATHS:
        torch.manual_seed(args.seed)  # the same mask for both
        mib = saved_activation_mib(params, loss_of, path)
        results.setdefault(path, {})["saved_activations_mib"] = mib
        log.info("%-12s saves %.1f MiB of activations for backward (same mask for both paths)", path, mib)

    peak = flops.peak_flops(device, args.precision)
    results["peak_flops"] = peak
    for path in PATHS:
        results[path]["flops_per_step"] = flops.training_step_flops(lambda: loss_of(path), device)
    for path in PATHS:
        torch.manual_seed(args.seed + 1)
        times = time_runs(lambda: [step(path) for _ in range(args.steps)], device, args.warmup, args.repeats)
        per_step = [t / args.steps for t in times]
        row = results[path]
        row.update(s_per_step=per_step, steps_per_s=1 / median(per_step),
                   images_per_s=args.batch_size / median(per_step),
                   mfu=flops.mfu(row["flops_per_step"], median(per_step), peak))
        log.info("%-12s %.3f steps/s  %.1f images/s  %s/step  MFU %s  (median s/step of %d runs: %s)", path,
                 row["steps_per_s"], row["images_per_s"], flops.human(row["flops_per_step"]), percent(row["mfu"]),
                 len(per_step), ", ".join(f"{t:.3f}" for t in per_step))
    ratio = median(results["all_tokens"]["s_per_step"]) / median(results["masked_only"]["s_per_step"])
    results["speedup"] = ratio
    log.info("speed-up (masked-only steps/s / all-tokens steps/s, medians): %.2fx", ratio)
    write_json(args.json, results)

    if not args.no_memory:
        del loss_of, step, params  # on CUDA the peak is taken in this process: free the timed model first
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        for path in PATHS:
            peak, before = peak_memory_mb(args, path) if device.type == "cuda" else peak_memory_in_child(args, path)
            results[path]["peak_memory_mib"] = peak
            if before is None:
                log.info("%-12s peak memory %.0f MiB (max_memory_allocated)", path, peak)
                write_json(args.json, results)  # before the second measurement, at a quarter of the batch
                fits_cards(args, path, peak, results[path])
            else:
                results[path]["rss_before_steps_mib"] = before
                log.info("%-12s peak memory %.0f MiB (child peak RSS; %.0f MiB of it before the first step)",
                         path, peak, before)
            write_json(args.json, results)
    results["machine_after"] = machine_line(device)
    log.info("machine after: %s", results["machine_after"])
    write_json(args.json, results)
    return results


def losses_agree(losses, precision):
    """Whether the two paths' losses on the same draws agree: |masked_only - all_tokens| / max(1, |all_tokens|)
    within LOSS_TOLERANCE of the precision (half precisions round the two paths' different shapes apart)."""
    a, b = losses["masked_only"], losses["all_tokens"]
    difference = abs(a - b) / max(1.0, abs(b))
    tolerance = LOSS_TOLERANCE[precision]
    return {"relative_difference": difference, "tolerance": tolerance, "agree": difference <= tolerance}


def fits_cards(args, path, peak, row):
    """CUDA: the peak at a quarter of the batch too, and the largest batch each card size fits."""
    small = args.batch_size // 4
    if small < 1:
        return
    peaks = {args.batch_size: peak, small: peak_memory_mb(argparse.Namespace(**{**vars(args), "batch_size": small}),
                                                          path)[0]}
    row["peak_memory_mib_by_batch"] = peaks
    row["largest_batch"] = {f"{gib}GB": largest_batch(peaks, gib) for gib in CARDS_GIB}
    log.info("%-12s peak memory %.0f MiB at batch %d: largest batch per GPU %s", path, peaks[small], small,
             ", ".join(f"{n} on a {card} card" for card, n in row["largest_batch"].items()))


def percent(fraction):
    """MFU for the log; each path's own FLOPs (the all-tokens path does more work per image)."""
    return "n/a (no peak known for this device)" if fraction is None else f"{100 * fraction:.1f}%"


if __name__ == "__main__":
    main()
