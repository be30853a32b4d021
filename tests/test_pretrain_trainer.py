"""The pretraining `Trainer` itself, not only its helpers: 2 gloo ranks = 1 rank on the
union batch, GradCache (`train.micro_batch`) = the full batch, each rank trains on its
own slice, and batch-norm statistics under GradCache advance once per micro-batch.

Tolerance: weights agree to 1e-5 after 3 AdamW steps (float sums reorder across ranks
and micro-batches; a wrong slice or a loss without the other rank's negatives is off by
orders of magnitude more).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vlkit.pretrain.config import config_from_dict
from vlkit.pretrain.distributed import DistInfo
from vlkit.pretrain.run import pretrain
from vlkit.pretrain.trainer import Trainer

from pretrain_fakes import exact_config, gloo_threads, make_dataset, tiny_config

ATOL = 1e-5
WORLD = 2
SLICES = [(0, 0), (0, 1), (1, 0)]  # (epoch, step) batches compared rank by rank


@pytest.fixture(scope="module")
def meta(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("pairs"))


def _configs(meta: Path, out: Path) -> dict[str, dict]:
    return {
        "global": exact_config(meta, out),
        "local": exact_config(meta, out, local_loss=True),
        "gradcache": exact_config(meta, out, micro_batch=2),  # 2 micro-batches of each rank's 4
    }


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _ddp_worker(rank: int, world: int, init_file: str, configs: dict, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    info = DistInfo(rank=rank, world_size=world)
    out: dict = {}
    for name, d in configs.items():
        trainer = Trainer(config_from_dict(d), Path(out_dir) / name, info)
        if name == "global":
            out["slices"] = [trainer.batch(e, s) for e, s in SLICES]
        trainer.fit()
        out[name] = _weights(trainer)
    del trainer  # its DDP wrapper holds the process group
    # Last, the whole run as `vlkit pretrain` under torchrun does it; it destroys the group.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    pretrain(config_from_dict(configs["global"]), run_dir=Path(out_dir) / "pretrain", progress=False, export=False)
    out["gloo_threads_after_cleanup"] = gloo_threads()
    torch.save(out, os.path.join(out_dir, f"{rank}.pt"))


@pytest.fixture(scope="module")
def two_ranks(meta, tmp_path_factory) -> list[dict]:
    """Every config trained on 2 gloo ranks; per rank: its batch slices and final weights."""
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("ddp")
    configs = _configs(meta, tmp / "runs")
    mp.spawn(_ddp_worker, args=(WORLD, str(tmp / "init"), configs, str(tmp)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp / f"{r}.pt", weights_only=True) for r in range(WORLD)]
    with safe_open(str(tmp / "pretrain" / "checkpoints" / "last.safetensors"), framework="pt") as f:
        ranks[0]["pretrain"] = {k[len("model."):]: f.get_tensor(k) for k in f.keys() if k.startswith("model.")}
    return ranks


@pytest.fixture(scope="module")
def one_rank(meta, tmp_path_factory) -> dict:
    """The global-loss config on one process: its full batches and final weights."""
    tmp = tmp_path_factory.mktemp("one")
    trainer = Trainer(config_from_dict(exact_config(meta, tmp / "runs")), tmp / "run", DistInfo())
    batches = [trainer.batch(e, s) for e, s in SLICES]
    start = _weights(trainer)
    trainer.fit()
    return {"batches": batches, "start": start, "weights": _weights(trainer)}


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], atol=ATOL, rtol=0), (what, k, (got[k] - want[k]).abs().max())


def test_each_rank_trains_on_its_own_slice_of_the_global_batch(two_ranks, one_rank):
    for (e, s), full, *per_rank in zip(SLICES, one_rank["batches"], *[r["slices"] for r in two_ranks]):
        pixels, (ids, mask) = full
        n = len(pixels) // WORLD
        for rank, (px, (r_ids, r_mask)) in enumerate(per_rank):
            lo, hi = rank * n, (rank + 1) * n
            assert torch.equal(px, pixels[lo:hi]), (e, s, rank)
            width = r_ids.shape[1]  # a slice pads to its own longest caption
            assert torch.equal(r_ids, ids[lo:hi, :width]) and torch.equal(r_mask, mask[lo:hi, :width]), (e, s, rank)
            assert not mask[lo:hi, width:].any()
        # the two slices differ, so a rank reusing rank 0's rows cannot pass the check above
        assert not torch.equal(per_rank[0][0], per_rank[1][0])


@pytest.mark.parametrize("mode", ["global", "local", "gradcache"])
def test_two_ranks_train_the_weights_one_rank_trains_on_the_union_batch(two_ranks, one_rank, mode):
    for rank, res in enumerate(two_ranks):
        _assert_close(res[mode], one_rank["weights"], f"{mode} rank {rank}")
    # training moved the weights far beyond the tolerance, so agreement within it means something
    moved = max(float((two_ranks[0][mode][k] - v).abs().max()) for k, v in one_rank["start"].items())
    assert moved > 1000 * ATOL


def test_two_rank_pretrain_run_equals_one_rank_and_leaves_no_gloo_thread(two_ranks, one_rank):
    """`pretrain()` under torchrun-style env vars: rank 0's checkpoint holds the one-rank weights,
    and once it returns no gloo thread is left to abort the process at exit."""
    _assert_close(two_ranks[0]["pretrain"], one_rank["weights"], "pretrain()")
    assert [r["gloo_threads_after_cleanup"] for r in two_ranks] == [[], []]


def test_micro_batch_through_the_trainer_equals_the_full_batch(meta, tmp_path, one_rank):
    trainer = Trainer(config_from_dict(exact_config(meta, tmp_path / "runs", micro_batch=3)), tmp_path / "gc", DistInfo())
    sizes: list[int] = []
    trainer.model.vision_model.register_forward_pre_hook(lambda m, args, kwargs: sizes.append(len(kwargs["pixel_values"])), with_kwargs=True)
    trainer.fit()
    # GradCache really ran: every step embeds 3 + 3 + 2 images without a graph, then again with one
    assert sizes == [3, 3, 2, 3, 3, 2] * 3
    _assert_close(_weights(trainer), one_rank["weights"], "micro_batch=3")


def test_gradcache_in_the_trainer_updates_batch_norm_statistics_once_per_micro_batch(meta, tmp_path):
    d = tiny_config(meta, tmp_path / "runs")
    d["train"].update(micro_batch=2, max_steps=1)  # batch 4 = 2 micro-batches
    trainer = Trainer(config_from_dict(d), tmp_path / "bn", DistInfo())
    bns = {n: m for n, m in trainer.model.vision_model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert bns, "the ResNet tower must carry batch norm for this test to mean anything"
    reference = copy.deepcopy(trainer.model.vision_model).train()
    pixels, _ = trainer.batch(0, 0)
    with torch.no_grad():  # what the statistics must be: each micro-batch seen once, in order
        for chunk in pixels.split(2):
            reference(pixel_values=chunk)
    trainer.fit()
    ref_modules = dict(reference.named_modules())
    for name, bn in bns.items():
        ref = ref_modules[name]
        assert int(bn.num_batches_tracked) == 2, name
        assert torch.allclose(bn.running_mean, ref.running_mean, atol=1e-6, rtol=0), name
        assert torch.allclose(bn.running_var, ref.running_var, atol=1e-6, rtol=0), name
