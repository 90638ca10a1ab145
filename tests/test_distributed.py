"""torchrun with 2 CPU processes (gloo): caching and training split the data and stay in sync."""
import json
import types

import numpy as np
import pytest
import torch

from tests.pipeline_fixtures import load, make_image_folder, run, tiny_flags, torchrun, write_launcher
from util.train.state import LAST
from util.data.datasets import ImageFolderADM, ResumableSampler


def test_sampler_splits_ranks_and_skips(tmp_path):
    samplers = [ResumableSampler(11, num_replicas=2, rank=r, seed=4) for r in range(2)]
    for epoch in range(3):
        parts = []
        for s in samplers:
            s.set_epoch(epoch)
            parts.append(list(s))
        assert len(parts[0]) == len(parts[1]) == 5 and not set(parts[0]) & set(parts[1])
    first = samplers[0].epoch_indices(0)
    assert samplers[0].epoch_indices(1) != first and samplers[0].epoch_indices(0) == first
    samplers[0].set_epoch(0, skip=3)
    assert list(samplers[0]) == first[3:] and len(samplers[0]) == 2


def test_steps_per_epoch_count_full_batches_only():
    """The loader drops the last partial batch (drop_last): 11 items on 2 ranks = 5 per rank = 2 full batches of 2
    (bug: rounding up, 3, which skews the lr schedule's epoch fraction and the end-of-epoch checks)."""
    from util.data.datasets import steps_per_epoch
    assert [steps_per_epoch(ResumableSampler(11, num_replicas=2, rank=1), b) for b in (1, 2, 3, 5, 6)] == [5, 2, 1, 1, 0]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """main_cache.py, then main_mar.py (train + online eval), each under torchrun --nproc_per_node=2."""
    tmp = tmp_path_factory.mktemp("ddp")
    data = make_image_folder(tmp / "data", classes=2, per_class=6)
    cached = run(torchrun() + ["--standalone", "--nproc_per_node=2", "main_cache.py", "--tokenizer", "pixel",
                               "--img_size", "8", "--data_path", str(data), "--cached_path", str(tmp / "cache"),
                               "--batch_size", "2", "--num_workers", "0", "--shard_size", "4"])
    assert cached.returncode == 0, cached.stderr[-3000:]
    trained = run(torchrun() + ["--standalone", "--nproc_per_node=2", write_launcher(tmp)] + tiny_flags(
        use_cached=True, cached_path=tmp / "cache", output_dir=tmp / "run", epochs=2, online_eval=True,
        eval_freq=5, num_images=4, eval_bsz=1, num_iter=2, fid_stats="none"))
    assert trained.returncode == 0, trained.stderr[-3000:]
    return tmp, data


def test_cache_shards_from_two_ranks_hold_the_right_images(two_process_run):
    tmp, data = two_process_run
    index = json.loads((tmp / "cache" / "index.json").read_text())
    assert index["num_cached"] == 12 and [s["count"] for s in index["shards"]] == [4, 4, 4]
    folder = ImageFolderADM(str(data / "train"), 8, flip=False)
    stored = np.concatenate([np.load(tmp / "cache" / s["moments"]) for s in index["shards"]])
    for i in range(12):
        image, label = folder.load(i)
        np.testing.assert_allclose(stored[i, 0], image.numpy(), atol=1e-3)  # fp16 of the pixel values
        np.testing.assert_allclose(stored[i, 1], image.flip(-1).numpy(), atol=1e-3)


def test_ranks_saw_different_data_and_ended_in_sync(two_process_run):
    tmp, _ = two_process_run
    ckpt = load(tmp / "run" / LAST)
    state = ckpt["train_state"]
    assert state["global_step"] == 6 and state["data_order"]["world_size"] == 2
    batches = state["data_order"]["last_batch_indices"]
    assert len(batches) == 2 and len(batches[0]) == len(batches[1]) == 2
    assert not set(batches[0]) & set(batches[1])  # different data on each rank
    sums = state["replica_weight_sums"]
    assert len(sums) == 2 and sums[0] == sums[1]  # identical weights (checked parameter by parameter)
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # one RNG stream per rank
    assert ckpt["args"]["lr"] == pytest.approx(1e-2 * 4 / 256)  # blr x global batch / 256


def test_online_eval_splits_images_across_ranks(two_process_run):
    tmp, _ = two_process_run
    for epoch in (0, 1):
        (folder,) = (tmp / "run").glob(f"eval-ep{epoch}-*")
        assert sorted(p.name for p in (folder / "images").iterdir()) == [f"{i:06d}.png" for i in range(4)]
        metrics = json.loads((folder / "metrics.json").read_text())
        assert metrics["world_size"] == 2 and metrics["num_images"] == 4


def test_collectives_put_cpu_tensors_where_nccl_takes_them(monkeypatch):
    """NCCL serves CUDA tensors only: the evaluation's counts and features (CPU tensors) would raise
    "No backend type associated with device type cpu" in every torchrun run on GPUs."""
    from util import distributed
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    cpu = torch.zeros(2)
    assert distributed.collective_device(cpu, "nccl") == torch.device("cuda", 3)
    assert distributed.collective_device(cpu, "gloo") == torch.device("cpu")
    on_gpu = types.SimpleNamespace(device=torch.device("cuda", 1))  # a tensor already on a GPU stays there
    assert distributed.collective_device(on_gpu, "nccl") == torch.device("cuda", 1)


def test_collectives_wait_longer_than_nccl_s_ten_minutes(monkeypatch):
    """Other ranks wait in a barrier while rank 0 alone scores an evaluation and writes its npz: minutes
    on a slow file system, past NCCL's default 10-minute watchdog."""
    import datetime
    from util import distributed
    seen = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kwargs: seen.update(kwargs))
    distributed.init_distributed()
    assert seen["timeout"] == datetime.timedelta(hours=1)


def test_collectives_bring_their_results_back_from_the_collective_s_device(monkeypatch):
    """Under NCCL a CPU tensor travels as a GPU copy: the sum must come back into the caller's tensor,
    the gathered rows onto the caller's device, in its dtype (a copy stands in for the GPU one here)."""
    from util import distributed
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed, "for_collective", lambda t: t.clone())
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op: t.mul_(2))  # two ranks holding the same
    counts = torch.tensor([3.0, 1.0], dtype=torch.float64)
    assert distributed.all_reduce_sum(counts) is counts and counts.tolist() == [6.0, 2.0]

    monkeypatch.setattr(distributed, "all_gather_object", lambda n: [n, 1])  # rank 1 holds one row

    def gather(parts, padded):
        parts[0].copy_(padded)
        parts[1].copy_(torch.full_like(padded, 7))
    monkeypatch.setattr(torch.distributed, "all_gather", gather)
    rows = torch.tensor([[1, 2], [3, 4]], dtype=torch.int64)
    got = distributed.all_gather_rows(rows)
    assert got.dtype == torch.int64 and got.device == rows.device
    assert got.tolist() == [[1, 2], [3, 4], [7, 7]]


def test_init_picks_gloo_on_a_cpu_and_nccl_on_a_gpu(monkeypatch):
    """Bug: NCCL whatever the device (a CPU-only torchrun then fails at init: NCCL has no CPU tensors)."""
    from util import distributed
    seen = {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kwargs: seen.update(kwargs))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.init_distributed() == torch.device("cpu")
    assert seen["backend"] == "gloo" and "device_id" not in seen
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    assert distributed.init_distributed() == torch.device("cuda", 0) and seen["backend"] == "nccl"


def test_local_rank_is_the_node_s_not_the_global_rank(monkeypatch):
    """Bug: get_local_rank returning the global rank (on a second node rank 9 would pick GPU 9 of 8)."""
    from util import distributed
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 9)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.get_local_rank() == 1 and distributed.get_rank() == 9
    monkeypatch.setattr(distributed, "is_distributed", lambda: False)
    assert distributed.get_local_rank() == 0  # single-process: whatever the environment holds


def test_replicas_out_of_sync_are_caught_whichever_rank_differs(monkeypatch):
    """Bug: comparing ranks 2.. with rank 0 (an off-by-one), so two replicas never get compared."""
    from util import distributed
    model = torch.nn.Linear(2, 1)
    mine = distributed.replica_checksums(model)
    for others in ([[x + 1.0 for x in mine]], [mine, mine, [x + 1.0 for x in mine]]):
        monkeypatch.setattr(distributed, "all_gather_object", lambda obj: [obj] + others)
        with pytest.raises(RuntimeError, match=f"rank {len(others)}'s weights differ from rank 0's"):
            distributed.check_replicas_in_sync(model)
    monkeypatch.setattr(distributed, "all_gather_object", lambda obj: [obj, list(obj)])
    assert distributed.check_replicas_in_sync(model) == [mine, mine]


@pytest.mark.parametrize("rank", [0, 1])
def test_logging_is_info_with_a_file_on_rank_0_and_warnings_only_elsewhere(rank, tmp_path, monkeypatch):
    """Bugs: the levels inverted (rank 0 silent, every other rank chatty), or every rank appending to rank 0's
    log file."""
    import logging
    from util import distributed
    monkeypatch.setattr(distributed, "get_rank", lambda: rank)
    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        distributed.setup_logging(str(tmp_path / "logs" / "log.txt"))
        assert root.level == (logging.INFO if rank == 0 else logging.WARNING)
        files = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
        assert len(files) == (1 if rank == 0 else 0)
        record = logging.makeLogRecord({"name": "engine", "levelname": "WARNING", "msg": "slow"})
        assert root.handlers[0].format(record).endswith(f" [rank {rank}] WARNING engine: slow")
    finally:
        for handler in root.handlers:
            if handler not in saved[0]:
                handler.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


@pytest.mark.parametrize("env, joined", [({"RANK": "0"}, False), ({"WORLD_SIZE": "2"}, False),
                                         ({"RANK": "0", "WORLD_SIZE": "2"}, True)])
def test_init_joins_a_group_only_under_torchrun_and_only_once(monkeypatch, env, joined):
    """torchrun sets both RANK and WORLD_SIZE; one alone (a stray variable in a plain python run) is no launch, and a
    process already in a group (init called again) joins nothing. Bugs: RANK alone read as a launch (env:// then
    fails on the missing WORLD_SIZE), init_process_group called a second time (torch raises)."""
    from util import distributed
    calls = []
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda **kwargs: calls.append(kwargs))
    assert distributed.init_distributed() == torch.device("cpu")
    assert len(calls) == int(joined)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    distributed.init_distributed()
    assert len(calls) == int(joined)


def test_gathered_rows_are_padded_to_the_longest_rank_s(monkeypatch):
    """Rank 0 holds fewer rows than rank 1 (an evaluation's last images): every rank pads to the largest count.
    Bug: padded to rank 0's count (rank 1's rows would not fit, or be cut)."""
    from util import distributed
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(distributed, "for_collective", lambda t: t)
    monkeypatch.setattr(distributed, "all_gather_object", lambda n: [n, 3])  # rank 1 holds three rows
    shapes = []

    def gather(parts, padded):
        shapes.append(tuple(padded.shape))
        parts[0].copy_(padded)
        parts[1].copy_(torch.tensor([[5, 6], [7, 8], [9, 10]]))
    monkeypatch.setattr(torch.distributed, "all_gather", gather)
    got = distributed.all_gather_rows(torch.tensor([[1, 2]]))
    assert shapes == [(3, 2)] and got.tolist() == [[1, 2], [5, 6], [7, 8], [9, 10]]


def test_broadcast_sends_rank_0_s_object(monkeypatch):
    """Bug: each rank naming itself the source (every rank keeps its own object, or the collective hangs)."""
    from util import distributed
    seen = {}
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", lambda box, src: seen.update(src=src) or
                        box.__setitem__(0, "rank 0's"))
    assert distributed.broadcast_object("rank 1's") == "rank 0's" and seen == {"src": 0}


def test_replica_fingerprints_are_float64_sums():
    """1e8 + 1 is exact in float64 and rounds to 1e8 in float32 (its spacing there is 8): replicas a small update
    apart must not share a fingerprint. Bug: the sums taken in the weights' float32."""
    from util import distributed
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1e8, 1.0]]))
    assert distributed.replica_checksums(model) == [100000001.0]
